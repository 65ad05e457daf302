"""Multi-LoRA serving: adapter requests, PEFT loading, slots and the batched delta."""
