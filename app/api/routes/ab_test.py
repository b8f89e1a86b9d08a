"""A/B tests of LoRA weights (placeholder; filled in by the A/B work)."""

from fastapi import APIRouter

router = APIRouter(tags=["ab-test"])
