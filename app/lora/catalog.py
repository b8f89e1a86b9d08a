"""What operators see of the LoRA folder: the list and each LoRA's metadata and file facts.

Joins the registry (files, versions, metadata.json), the file facts (sha256 and the header gate's
format, rank, alpha, targets, read without loading tensors, once per file fingerprint) and the
manager (resident or not). No torch here.
"""

from __future__ import annotations

from app.errors import LoraNotFound
from app.lora.file_facts import LoraFileFacts
from app.lora.registry import LoraFile, LoraRegistry, UnsafeLoraPath

# Metadata fields shown in the list's short summary (the full metadata is on the metadata endpoint).
SUMMARY_FIELDS = ("type", "base_model", "training_steps", "version_notes", "trigger_words")


class LoraCatalog:
    def __init__(self, registry: LoraRegistry, facts: LoraFileFacts):
        self.registry = registry
        self.facts = facts

    def list(self, manager=None, offset: int = 0, limit: int = 100, visible=None) -> tuple[list[dict], int]:
        """One entry per brand (sorted by id), a page of them, and the total number of brands;
        `visible(brand_id)`, when given, keeps only the brands it accepts (a key's own)."""
        brand_ids = [b for b in self.registry.brand_ids() if visible is None or visible(b)]
        return [self._summary(b, manager) for b in brand_ids[offset : offset + limit]], len(brand_ids)

    def _summary(self, brand_id: str, manager) -> dict:
        entry: dict = {"brand_id": brand_id, "versions": [], "latest": None, "file": None, "valid": False}
        try:
            entry["versions"] = self.registry.versions(brand_id)
            entry["unsupported_files"] = self.registry.unsupported_files(brand_id)
            lora_file = self.registry.resolve(brand_id)
        except UnsafeLoraPath as exc:
            entry["invalid_reason"] = str(exc)
            return entry
        if lora_file is None:
            entry["invalid_reason"] = "no .safetensors LoRA file in this brand folder"
            return entry
        metadata, _ = self.registry.metadata(lora_file)
        facts = self.file_facts(lora_file, manager)
        entry.update(
            latest=lora_file.version,
            file=facts["path"],
            size_bytes=facts["size_bytes"],
            sha256=facts["sha256"],
            format=facts["format"],
            cached=facts["cached"],
            valid=facts["valid"],
            invalid_reason=facts["invalid_reason"],
            type=(metadata or {}).get("type"),
            metadata_summary={k: metadata[k] for k in SUMMARY_FIELDS if metadata and k in metadata} or None,
        )
        return entry

    def describe(self, brand_id: str, version: str | None, manager=None) -> dict:
        """The metadata endpoint's body; raises LoraNotFound naming what exists."""
        versions = self.registry.versions(brand_id)
        if not versions:
            raise LoraNotFound(f"no LoRA for brand_id {brand_id!r}")
        lora_file = self.registry.resolve(brand_id, version)
        if lora_file is None:
            raise LoraNotFound(f"brand {brand_id!r} has no version {version!r}; versions: {', '.join(versions)}")
        metadata, metadata_error = self.registry.metadata(lora_file)
        return {
            "brand_id": brand_id,
            "version": lora_file.version,
            "versions": versions,
            "latest": versions[-1],
            "metadata": metadata,
            "metadata_error": metadata_error,
            "file": self.file_facts(lora_file, manager),
        }

    def file_facts(self, lora_file: LoraFile, manager=None) -> dict:
        info, header_error = self.facts.header(lora_file)
        load_error = self.facts.invalid_reason(lora_file)
        facts = {
            "path": str(lora_file.path.relative_to(self.registry.root)),
            "size_bytes": lora_file.size_bytes,
            "sha256": self.facts.sha256(lora_file),
            "format": None,
            "rank": None,
            "alpha": None,
            "target_modules": None,
            "has_text_encoder": None,
            "dtype": None,
            "valid": header_error is None and load_error is None,
            "invalid_reason": header_error or load_error,
            "cached": manager.is_cached(lora_file) if manager is not None else False,
        }
        if info is not None:
            facts.update(
                format=info.format,
                rank=info.rank,
                alpha=info.alpha,
                target_modules=info.target_modules,
                has_text_encoder=info.has_text_encoder,
                dtype=info.dtype,
            )
        return facts
