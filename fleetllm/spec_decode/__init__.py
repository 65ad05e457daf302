"""N-gram speculative decoding: proposer, rejection sampler, metrics (issue 13)."""
