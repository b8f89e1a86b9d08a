"""A/B tests of LoRA weights: planning variants, running them, the contact sheet, and the choice store."""
