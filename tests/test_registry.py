import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.lora import file_facts as file_facts_module
from app.lora import registry as registry_module
from app.lora.file_facts import LoraFileFacts
from app.lora.registry import (
    LORA_DIR_README,
    InvalidLoraId,
    LoraRegistry,
    UnsafeLoraPath,
    validate_lora_id,
)


def write_lora(path: Path, seed: int = 0) -> Path:
    """A tiny real kohya LoRA; the seed makes files with different bytes."""
    rng = np.random.default_rng(seed)
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            f"{module}.lora_down.weight": rng.standard_normal((4, 8)).astype(np.float16),
            f"{module}.lora_up.weight": rng.standard_normal((8, 4)).astype(np.float16),
            f"{module}.alpha": np.array(4.0, dtype=np.float16),
        },
        str(path),
    )
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    root.mkdir()
    return root


@pytest.fixture
def reg(root: Path) -> LoraRegistry:
    return LoraRegistry(root)


# -- ids ----------------------------------------------------------------------------------------

BAD_IDS = ["..", "../x", "/etc", "a/b", "%2e%2e", "", "a" * 65, "-a", ".a", "a..b", "a\n", "a b", "a\\b"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_are_refused_everywhere(reg: LoraRegistry, bad: str):
    with pytest.raises(InvalidLoraId, match="brand_id"):
        validate_lora_id(bad)
    with pytest.raises(InvalidLoraId):
        reg.resolve(bad)
    with pytest.raises(InvalidLoraId):
        reg.versions(bad)
    with pytest.raises(InvalidLoraId):
        reg.unsupported_files(bad)


def test_invalid_id_message_names_field_and_pattern():
    with pytest.raises(InvalidLoraId) as exc:
        validate_lora_id("../x", field="version")
    assert "version" in str(exc.value)
    assert registry_module.ID_PATTERN.pattern in str(exc.value)


@pytest.mark.parametrize("good", ["acme", "a", "Acme_2.0-beta", "a" * 64, "0brand"])
def test_valid_ids_pass(good: str):
    assert validate_lora_id(good) == good


@pytest.mark.parametrize("bad", ["2", "latest", "v", "v1/..", "../v1", "V1", "v-1", "v1.0"])
def test_invalid_versions_are_refused(reg: LoraRegistry, root: Path, bad: str):
    write_lora(root / "acme" / "v1" / "style.safetensors")
    with pytest.raises(InvalidLoraId, match="version"):
        reg.resolve("acme", bad)


# -- lookup -------------------------------------------------------------------------------------


def test_file_lookup_order(reg: LoraRegistry, root: Path):
    folder = root / "acme" / "v1"
    style = write_lora(folder / "style.safetensors")
    lora = write_lora(folder / "lora.safetensors")
    named = write_lora(folder / "acme.safetensors")
    other = write_lora(folder / "other.safetensors")

    assert reg.resolve("acme").path == style.resolve()
    style.unlink()
    assert reg.resolve("acme").path == lora.resolve()
    lora.unlink()
    assert reg.resolve("acme").path == named.resolve()
    named.unlink()
    assert reg.resolve("acme").path == other.resolve()  # the only other .safetensors


def test_two_unnamed_files_are_ambiguous(reg: LoraRegistry, root: Path):
    write_lora(root / "acme" / "v1" / "a.safetensors")
    write_lora(root / "acme" / "v1" / "b.safetensors")
    assert reg.resolve("acme") is None
    assert reg.versions("acme") == []


def test_hidden_safetensors_is_not_the_only_other_file(reg: LoraRegistry, root: Path):
    write_lora(root / "acme" / "v1" / "real.safetensors")
    write_lora(root / "acme" / "v1" / "._real.safetensors")  # macOS companion file
    assert reg.resolve("acme").path.name == "real.safetensors"


def test_versions_sort_by_number_and_latest_is_highest(reg: LoraRegistry, root: Path):
    for version in ["v2", "v10", "v1"]:
        write_lora(root / "acme" / version / "style.safetensors")
    (root / "acme" / "v11").mkdir()  # no file yet (upload in progress): not a version
    (root / "acme" / "old").mkdir()
    write_lora(root / "acme" / "old" / "style.safetensors")  # not a version folder name

    assert reg.versions("acme") == ["v1", "v2", "v10"]
    latest = reg.resolve("acme")
    assert (latest.version, latest.key) == ("v10", "acme@v10")
    assert latest.path == (root / "acme" / "v10" / "style.safetensors").resolve()


def test_explicit_and_unknown_version(reg: LoraRegistry, root: Path):
    write_lora(root / "acme" / "v1" / "style.safetensors")
    write_lora(root / "acme" / "v2" / "style.safetensors", seed=1)
    v1 = reg.resolve("acme", "v1")
    assert v1.version == "v1"
    assert v1.path == (root / "acme" / "v1" / "style.safetensors").resolve()
    assert reg.resolve("acme", "v7") is None
    assert reg.resolve("acme", "default") is None  # version folders exist, so there is no default


def test_default_version_when_file_is_in_brand_folder(reg: LoraRegistry, root: Path):
    path = write_lora(root / "globex" / "globex.safetensors")
    assert reg.versions("globex") == ["default"]
    for lora_file in (reg.resolve("globex"), reg.resolve("globex", "default")):
        assert lora_file.version == "default"
        assert lora_file.key == "globex"
        assert lora_file.path == path.resolve()
    assert reg.resolve("globex", "v1") is None


def test_version_folders_win_over_direct_file(reg: LoraRegistry, root: Path):
    write_lora(root / "acme" / "style.safetensors")
    write_lora(root / "acme" / "v3" / "style.safetensors", seed=1)
    assert reg.versions("acme") == ["v3"]
    assert reg.resolve("acme").version == "v3"


def test_missing_brand_and_empty_brand(reg: LoraRegistry, root: Path):
    assert reg.resolve("nobody") is None
    assert reg.versions("nobody") == []
    (root / "empty").mkdir()
    assert reg.resolve("empty") is None
    assert reg.versions("empty") == []


def test_lora_file_facts(reg: LoraRegistry, root: Path):
    path = write_lora(root / "acme" / "v1" / "style.safetensors")
    lora_file = reg.resolve("acme")
    st = os.stat(path)
    assert lora_file.size_bytes == st.st_size == path.stat().st_size
    assert lora_file.fingerprint == (st.st_size, st.st_mtime_ns, st.st_ino)
    with pytest.raises(AttributeError):
        lora_file.version = "v2"  # frozen


def test_brand_ids_and_count(reg: LoraRegistry, root: Path):
    write_lora(root / "beta" / "v1" / "style.safetensors")
    write_lora(root / "alpha" / "alpha.safetensors")
    (root / "empty").mkdir()
    (root / ".trash").mkdir()
    (root / "bad name").mkdir()
    (root / "README.md").write_text("not a brand")
    assert reg.brand_ids() == ["alpha", "beta", "empty"]
    assert reg.count() == 2


def test_missing_root_has_no_brands(tmp_path: Path):
    reg = LoraRegistry(tmp_path / "nowhere")
    assert reg.brand_ids() == []
    assert reg.count() == 0
    assert reg.resolve("acme") is None


# -- confinement --------------------------------------------------------------------------------


def test_symlinked_file_outside_root_is_refused(reg: LoraRegistry, root: Path, tmp_path: Path):
    outside = write_lora(tmp_path / "outside" / "secret.safetensors")
    (root / "acme" / "v1").mkdir(parents=True)
    (root / "acme" / "v1" / "style.safetensors").symlink_to(outside)
    with pytest.raises(UnsafeLoraPath) as exc:
        reg.resolve("acme")
    assert "acme" in str(exc.value)
    assert str(outside) not in str(exc.value)  # the target is not revealed
    assert reg.count() == 0


def test_symlinked_brand_folder_outside_root_is_refused(reg: LoraRegistry, root: Path, tmp_path: Path):
    write_lora(tmp_path / "outside" / "v1" / "style.safetensors")
    (root / "acme").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(UnsafeLoraPath, match="acme"):
        reg.resolve("acme")
    with pytest.raises(UnsafeLoraPath):
        reg.versions("acme")
    assert reg.brand_ids() == []


def test_symlinked_version_folder_outside_root_is_refused(reg: LoraRegistry, root: Path, tmp_path: Path):
    write_lora(tmp_path / "outside" / "style.safetensors")
    (root / "acme").mkdir()
    (root / "acme" / "v1").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(UnsafeLoraPath, match="acme"):
        reg.resolve("acme", "v1")


def test_symlinks_inside_root_work(reg: LoraRegistry, root: Path):
    target = write_lora(root / "shared" / "v1" / "style.safetensors")
    (root / "alias").symlink_to(root / "shared", target_is_directory=True)
    (root / "linked" / "v1").mkdir(parents=True)
    (root / "linked" / "v1" / "style.safetensors").symlink_to(target)

    for brand in ("alias", "linked"):
        lora_file = reg.resolve(brand)
        assert lora_file.brand_id == brand
        assert lora_file.path == target.resolve()
    assert reg.brand_ids() == ["alias", "linked", "shared"]


def test_root_given_through_a_symlink(tmp_path: Path):
    real_root = tmp_path / "real"
    path = write_lora(real_root / "acme" / "v1" / "style.safetensors")
    (tmp_path / "link").symlink_to(real_root, target_is_directory=True)
    reg = LoraRegistry(tmp_path / "link")
    assert reg.root == real_root.resolve()
    assert reg.resolve("acme").path == path.resolve()


# -- sha256 -------------------------------------------------------------------------------------


def test_sha256_is_cached_until_the_file_is_replaced(reg: LoraRegistry, root: Path, monkeypatch):
    calls = []
    real_hash = file_facts_module._hash_file

    def counting_hash(path):
        calls.append(path)
        return real_hash(path)

    monkeypatch.setattr(file_facts_module, "_hash_file", counting_hash)
    facts = LoraFileFacts(max_file_bytes=1024 * 1024)
    path = write_lora(root / "acme" / "v1" / "style.safetensors")

    first = reg.resolve("acme")
    first_hash = facts.sha256(first)
    assert first_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert facts.sha256(first) == first_hash
    assert facts.sha256(reg.resolve("acme")) == first_hash
    assert len(calls) == 1

    # Replace the file the way an upload should: write elsewhere, then rename over it.
    replacement = write_lora(root / "acme" / "v1" / ".upload.tmp", seed=1)
    os.replace(replacement, path)
    second = reg.resolve("acme")
    assert second.fingerprint != first.fingerprint
    second_hash = facts.sha256(second)
    assert second_hash == hashlib.sha256(path.read_bytes()).hexdigest() != first_hash
    assert len(calls) == 2
    assert facts.sha256(second) == second_hash
    assert len(calls) == 2


# -- metadata -----------------------------------------------------------------------------------


def test_metadata_from_version_folder_then_brand_folder(reg: LoraRegistry, root: Path):
    write_lora(root / "acme" / "v1" / "style.safetensors")
    write_lora(root / "acme" / "v2" / "style.safetensors", seed=1)
    (root / "acme" / "metadata.json").write_text('{"type": "style", "trigger_words": ["acme"]}')
    (root / "acme" / "v2" / "metadata.json").write_text('{"training_steps": 2000, "extra": {"k": 1}}')

    assert reg.metadata(reg.resolve("acme", "v2")) == ({"training_steps": 2000, "extra": {"k": 1}}, None)
    assert reg.metadata(reg.resolve("acme", "v1")) == ({"type": "style", "trigger_words": ["acme"]}, None)


def test_metadata_missing(reg: LoraRegistry, root: Path):
    write_lora(root / "acme" / "acme.safetensors")
    assert reg.metadata(reg.resolve("acme")) == (None, None)


@pytest.mark.parametrize(
    ("text", "words"),
    [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ('"text"', "JSON object")],
)
def test_metadata_invalid(reg: LoraRegistry, root: Path, text: str, words: str):
    write_lora(root / "acme" / "v1" / "style.safetensors")
    (root / "acme" / "v1" / "metadata.json").write_text(text)
    metadata, error = reg.metadata(reg.resolve("acme"))
    assert metadata is None
    assert words in error


def test_metadata_symlink_outside_root_is_an_error(reg: LoraRegistry, root: Path, tmp_path: Path):
    (tmp_path / "secret.json").write_text('{"secret": true}')
    write_lora(root / "acme" / "v1" / "style.safetensors")
    (root / "acme" / "v1" / "metadata.json").symlink_to(tmp_path / "secret.json")
    metadata, error = reg.metadata(reg.resolve("acme"))
    assert metadata is None
    assert "outside" in error


# -- unsupported files and README -----------------------------------------------------------------


def test_unsupported_files_are_listed_and_never_loaded(reg: LoraRegistry, root: Path):
    (root / "acme" / "v2").mkdir(parents=True)
    (root / "acme" / "model.ckpt").write_bytes(b"\x80\x04pickle")
    (root / "acme" / "v2" / "style.pt").write_bytes(b"PK\x03\x04zip")
    (root / "acme" / "v2" / "weights.BIN").write_bytes(b"\x80\x02")
    (root / "acme" / "notes.txt").write_text("fine")
    assert reg.unsupported_files("acme") == ["model.ckpt", "v2/style.pt", "v2/weights.BIN"]
    assert reg.versions("acme") == []
    assert reg.resolve("acme") is None
    assert reg.unsupported_files("nobody") == []


def test_ensure_root_writes_readme_once(tmp_path: Path):
    reg = LoraRegistry(tmp_path / "new" / "loras")
    reg.ensure_root()
    readme = tmp_path / "new" / "loras" / "README.md"
    assert readme.read_text() == LORA_DIR_README.read_text()
    for words in ("style.safetensors", "lora.safetensors", "metadata.json", "trigger_words", "v10"):
        assert words in readme.read_text()

    readme.write_text("edited by the operator")
    reg.ensure_root()
    assert readme.read_text() == "edited by the operator"
    assert reg.brand_ids() == []


def test_ensure_root_tolerates_a_read_only_folder(tmp_path: Path, monkeypatch):
    """A read-only mount (docker -v ...:ro): start-up warns and goes on, and the LoRAs are still found."""
    root = tmp_path / "loras"
    write_lora(root / "acme" / "style.safetensors")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    warnings = []
    monkeypatch.setattr(registry_module.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "mkdir", read_only)
    reg = LoraRegistry(root)
    reg.ensure_root()
    LoraRegistry(tmp_path / "missing").ensure_root()
    assert not (root / "README.md").exists()
    assert reg.brand_ids() == ["acme"]
    assert "not writable" in warnings[0] and "could not be created" in warnings[1]
