"""POST /lora/{brand_id}/versions (upload) and DELETE /lora/{brand_id}/versions/{version}."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import count_reader_hashes, generate, png_bytes, sha256_of


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_lora, make_foreign_lora) -> dict:
    folder = tmp_path_factory.mktemp("upload-files")
    return {
        "good": make_lora(folder / "good.safetensors", seed=31),
        "other": make_lora(folder / "other.safetensors", key_format="kohya", seed=32),
        "foreign": make_foreign_lora(folder / "foreign.safetensors"),
    }


def upload(c, brand: str, path: Path, filename: str = "my.safetensors", headers=None, **fields):
    data = {k: (json.dumps(v) if k == "metadata" and not isinstance(v, str) else v) for k, v in fields.items()}
    return c.post(f"/lora/{brand}/versions", files={"file": (filename, path.read_bytes())}, data=data,
                  headers=headers or {})  # fmt: skip



def on_disk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.name != "README.md")


def test_upload_becomes_the_latest_version_and_serves_the_next_request(make_client, lora_root, files, expected_png):
    assert files["good"].stat().st_size > 64 * 1024  # larger than MAX_BODY_BYTES: uploads are exempt
    with make_client(lora_root) as c:
        first = upload(c, "acme", files["good"], metadata={"type": "style", "trigger_words": ["acmestyle"]})
        assert first.status_code == 201, first.text
        assert first.json() == {
            "brand_id": "acme", "version": "v1", "file": "acme/v1/style.safetensors",
            "sha256": sha256_of(files["good"]), "size_bytes": files["good"].stat().st_size,
            "format": "peft", "rank": 4,
        }  # fmt: skip
        stored = lora_root / "acme" / "v1" / "style.safetensors"
        assert stored.read_bytes() == files["good"].read_bytes()
        assert json.loads((lora_root / "acme" / "v1" / "metadata.json").read_text())["trigger_words"] == ["acmestyle"]
        assert on_disk(lora_root) == ["acme", "acme/v1", "acme/v1/metadata.json", "acme/v1/style.safetensors"]

        body = generate(c, brand_id="acme")
        assert body["loras"][0]["version"] == "v1" and body["loras"][0]["sha256"] == sha256_of(files["good"])
        assert png_bytes(body["image"]) == expected_png(stored, 0.8)

        second = upload(c, "acme", files["other"])
        assert second.status_code == 201 and second.json()["version"] == "v2" and second.json()["format"] == "kohya"
        assert generate(c, brand_id="acme")["loras"][0]["version"] == "v2"
        assert c.get("/lora/acme/metadata").json()["versions"] == ["v1", "v2"]

        explicit = upload(c, "acme", files["other"], version="v7")
        assert explicit.status_code == 201 and explicit.json()["version"] == "v7"
        assert upload(c, "acme", files["good"]).json()["version"] == "v8"


def test_existing_version_is_409_and_changes_nothing(make_client, lora_root, files, make_brand):
    make_brand(lora_root, "acme", "v1", seed=3)
    before = (lora_root / "acme" / "v1" / "style.safetensors").read_bytes()
    with make_client(lora_root) as c:
        response = upload(c, "acme", files["good"], version="v1")

    assert response.status_code == 409 and "v1" in response.json()["detail"]
    assert (lora_root / "acme" / "v1" / "style.safetensors").read_bytes() == before
    assert on_disk(lora_root) == ["acme", "acme/v1", "acme/v1/style.safetensors"]


REFUSED = {
    "a LoRA for another model": ("foreign", "x.safetensors", {}, "file", "does not fit"),
    "a pickle": ("good", "x.ckpt", {}, "file", "pickle"),
    "not .safetensors": ("good", "x.txt", {}, "file", ".safetensors"),
    "bad metadata": ("good", "x.safetensors", {"metadata": "{not json"}, "metadata", "JSON"),
    "metadata not an object": ("good", "x.safetensors", {"metadata": "[1]"}, "metadata", "object"),
    "bad version": ("good", "x.safetensors", {"version": "latest"}, "version", "v1, v2"),
    "unknown field": ("good", "x.safetensors", {"colour": "red"}, "colour", "allowed"),
}


@pytest.mark.parametrize("name, filename, fields, field, words", REFUSED.values(), ids=REFUSED.keys())
def test_refused_upload_is_422_and_leaves_nothing_on_disk(make_client, lora_root, files, name, filename, fields,
                                                          field, words):  # fmt: skip
    with make_client(lora_root) as c:
        response = upload(c, "newbrand", files[name], filename=filename, **fields)

    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", field] and words in error["msg"], error
    assert on_disk(lora_root) == []


def test_garbage_and_pickle_content_are_refused(make_client, lora_root, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04\x95" + b"pickle" * 100)
    with make_client(lora_root) as c:
        response = upload(c, "acme", garbage)
        missing_file = c.post("/lora/acme/versions", data={"version": "v1"}, files={"metadata": (None, "{}")})
    assert response.status_code == 422 and "pickle" in response.json()["detail"][0]["msg"]
    assert missing_file.status_code == 422 and "'file'" in missing_file.json()["detail"][0]["msg"]
    assert on_disk(lora_root) == []


def test_too_large_is_413_with_and_without_content_length(make_client, lora_root, files):
    big = b"x" * (1024 * 1024 + 10)
    with make_client(lora_root, lora_max_file_mb=1) as c:
        declared = c.post("/lora/acme/versions", files={"file": ("big.safetensors", big)})

        boundary = "formatsboundary"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.safetensors"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip

        def chunks():
            yield head
            for _ in range(40):
                yield b"y" * 65536  # 2.5 MB in all, never a Content-Length
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = c.post("/lora/acme/versions", content=chunks(),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip

    assert declared.status_code == 413 and "LORA_MAX_FILE_MB" in declared.json()["detail"]
    assert streamed.status_code == 413, streamed.text
    assert on_disk(lora_root) == []


def test_upload_over_a_flat_default_file_becomes_the_latest(make_client, lora_root, files, make_brand):
    make_brand(lora_root, "acme", seed=5)  # acme/style.safetensors: version "default"
    with make_client(lora_root) as c:
        assert generate(c, brand_id="acme")["loras"][0]["version"] == "default"
        response = upload(c, "acme", files["good"])
        assert response.status_code == 201 and response.json()["version"] == "v1"
        assert generate(c, brand_id="acme")["loras"][0]["version"] == "v1"
        assert "acme" not in c.get("/lora/cache/stats").json()["cached"]  # the shadowed file left the cache


def test_delete_removes_a_version_and_drops_it_from_the_cache(make_client, lora_root, files, make_brand):
    make_brand(lora_root, "acme", "v1", seed=3)
    with make_client(lora_root) as c:
        upload(c, "acme", files["good"])  # v2
        assert generate(c, brand_id="acme")["loras"][0]["version"] == "v2"
        assert "acme@v2" in c.get("/lora/cache/stats").json()["cached"]

        assert c.delete("/lora/acme/versions/v2").status_code == 204
        assert not (lora_root / "acme" / "v2").exists()
        assert "acme@v2" not in c.get("/lora/cache/stats").json()["cached"]
        assert generate(c, brand_id="acme")["loras"][0]["version"] == "v1"

        unknown = c.delete("/lora/acme/versions/v2")
        assert unknown.status_code == 404 and "v1" in unknown.json()["detail"]
        assert c.delete("/lora/nobody/versions/v1").status_code == 404
        assert c.delete("/lora/acme/versions/latest").status_code == 422
        assert c.delete("/lora/..%2Fetc/versions/v1").status_code in (404, 422)
    assert on_disk(lora_root) == ["acme", "acme/v1", "acme/v1/style.safetensors"]


def test_uploads_and_removal_need_the_admin_key(make_client, lora_root, files):
    with make_client(lora_root, api_key="user", admin_api_key="admin") as c:
        user = {"Authorization": "Bearer user"}
        admin = {"Authorization": "Bearer admin"}
        assert upload(c, "acme", files["good"]).status_code == 401
        assert upload(c, "acme", files["good"], headers=user).status_code == 403
        assert upload(c, "acme", files["good"], headers=admin).status_code == 201
        assert c.delete("/lora/acme/versions/v1", headers=user).status_code == 403
        assert c.delete("/lora/acme/versions/v1").status_code == 401
        assert c.delete("/lora/acme/versions/v1", headers=admin).status_code == 204
        assert c.get("/lora/list", headers=user).status_code == 200  # other routes keep the user key


def test_an_uploaded_version_is_not_hashed_again_by_its_first_request(make_client, lora_root, files, monkeypatch):
    with make_client(lora_root) as c:
        uploaded = upload(c, "hashed", files["good"])
        hashes = count_reader_hashes(monkeypatch)  # from here: the service reading the new version
        body = generate(c, brand_id="hashed")

    assert uploaded.status_code == 201
    assert body["loras"][0]["sha256"] == uploaded.json()["sha256"] == sha256_of(files["good"])
    assert hashes == []  # the digest the upload computed while streaming was handed over
