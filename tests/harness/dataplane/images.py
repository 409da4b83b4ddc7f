"""Test images built here, as OCI image layouts, so no test pulls anything from the internet.

`multi_layer_image` is one linux image of several layers; `multi_platform_index`
is an OCI index of one image per platform (the host's, and another one). Both
are written as OCI layouts (`oci-layout`, `index.json`, `blobs/sha256/...`)
with correct digests, ready for `skopeo copy oci:<dir>:<tag> docker://...`.
Layer contents are deterministic pseudo-random bytes (incompressible, so sizes
mean something in timings) and unique per image and platform, so no two
images share a blob and per-blob counts in a registry log are unambiguous.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def host_arch() -> str:
    """The host's architecture in OCI terms (what containerd picks from an index)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def other_arch() -> str:
    return "arm64" if host_arch() != "arm64" else "amd64"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _noise(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return _digest(self.data)

    def ref(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


@dataclass(frozen=True)
class BuiltImage:
    """An OCI layout holding one tagged image or index."""

    name: str  # repository path, e.g. library/multi
    tag: str
    layout: Path
    top: Descriptor  # the tagged manifest or index
    blobs_for_host: tuple[str, ...]  # layer and config digests a host-platform pull fetches

    @property
    def short(self) -> str:
        """The Docker short name (library/ dropped)."""
        return self.name.removeprefix("library/")

    @property
    def bytes_for_host(self) -> int:
        """Bytes of the blobs a host-platform pull fetches (layers and config; the manifest is `top`)."""
        blobs = self.layout / "blobs" / "sha256"
        return sum((blobs / d.removeprefix("sha256:")).stat().st_size for d in self.blobs_for_host)

    def push(self, registry: str, *, creds: str | None = None) -> None:
        """skopeo copy the layout into `registry` (host:port, plain HTTP), all platforms, digests unchanged."""
        argv = ["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false"]
        if creds:
            argv += ["--dest-creds", creds]
        argv += [f"oci:{self.layout}:{self.tag}", f"docker://{registry}/{self.name}:{self.tag}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-800:]}")


def _layer(seed: str, size: int) -> tuple[Descriptor, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        payload = _noise(seed, size)
        info = tarfile.TarInfo(f"data/{hashlib.sha256(seed.encode()).hexdigest()[:12]}.bin")
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        tar.addfile(info, io.BytesIO(payload))
    diff_id = _digest(raw.getvalue())
    return Descriptor(OCI_LAYER, gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)), diff_id


def _image(seed: str, arch: str, layer_sizes: tuple[int, ...]) -> tuple[Descriptor, list[Descriptor]]:
    """(manifest, [config, layers...]) of one image."""
    layers = [_layer(f"{seed}/{arch}/{i}", size) for i, size in enumerate(layer_sizes)]
    config = Descriptor(
        OCI_CONFIG,
        json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Cmd": ["/bin/true"], "Labels": {"dev.regmirror.test": seed}},
                "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
            },
            sort_keys=True,
        ).encode(),
    )
    manifest = Descriptor(
        OCI_MANIFEST,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config.ref(),
                "layers": [layer.ref() for layer, _ in layers],
            }
        ).encode(),
    )
    return manifest, [config, *(layer for layer, _ in layers)]


def _write_layout(directory: Path, tag: str, top: Descriptor, blobs: list[Descriptor]) -> None:
    blob_dir = directory / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for blob in [*blobs, top]:
        (blob_dir / blob.digest.removeprefix("sha256:")).write_bytes(blob.data)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [top.ref(annotations={"org.opencontainers.image.ref.name": tag})],
    }
    (directory / "index.json").write_text(json.dumps(index))


def multi_layer_image(
    directory: Path, name: str = "library/multi", tag: str = "v1", layer_sizes: tuple[int, ...] = (1 << 20, 256 << 10, 16 << 10)
) -> BuiltImage:
    """A linux/<host arch> image of several layers."""
    manifest, blobs = _image(name, host_arch(), layer_sizes)
    _write_layout(directory, tag, manifest, blobs)
    return BuiltImage(name, tag, directory, manifest, tuple(b.digest for b in blobs))


def multi_platform_index(
    directory: Path, name: str = "library/multiarch", tag: str = "v1", layer_sizes: tuple[int, ...] = (512 << 10, 8 << 10)
) -> BuiltImage:
    """An OCI index of two single-platform images: the host's architecture and another one."""
    children: list[Descriptor] = []
    all_blobs: list[Descriptor] = []
    for_host: tuple[str, ...] = ()
    for arch in (host_arch(), other_arch()):
        manifest, blobs = _image(name, arch, layer_sizes)
        children.append(manifest)
        all_blobs += [*blobs, manifest]
        if arch == host_arch():
            for_host = tuple(b.digest for b in blobs)
    index = Descriptor(
        OCI_INDEX,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    m.ref(platform={"architecture": arch, "os": "linux"})
                    for m, arch in zip(children, (host_arch(), other_arch()), strict=True)
                ],
            }
        ).encode(),
    )
    _write_layout(directory, tag, index, all_blobs)
    return BuiltImage(name, tag, directory, index, for_host)
