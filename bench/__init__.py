"""The benchmark command: `python -m bench` drives the real engine and LoRA manager and prints a table."""
