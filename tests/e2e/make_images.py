#!/usr/bin/env python3
"""Write the e2e test images as OCI image layouts, without network access (stdlib only).

    make_images.py OUTDIR

creates OUTDIR/<image>/ (oci-layout, index.json, blobs/sha256/...) for:

  hello      single-arch linux/amd64 image, tag "latest"
  multi      OCI image index: linux/amd64 + linux/arm64, distinct layers, tag "latest"
  multilist  same shape as multi with its own content; the suite pushes it with
             `skopeo copy --all --format v2s2`, which turns it into a Docker manifest list
  tool       single-arch image for the ghcr.io upstream (owner/tool), tag "1.0"

Everything is deterministic (fixed mtimes, gzip mtime 0), so digests are stable across runs.
Prints one line per image: NAME TAG DIGEST-OF-THE-TOP-LEVEL-MANIFEST-OR-INDEX.
"""
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MTIME = 1700000000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class Layout:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def blob(self, data, media_type, **extra):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.root, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        desc = {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}
        desc.update(extra)
        return desc

    def json_blob(self, obj, media_type, **extra):
        data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
        return self.blob(data, media_type, **extra)

    def write_index(self, desc, tag):
        desc = dict(desc)
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]}
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump(index, f)


def layer_tar(files):
    """A gzip-compressed tar of {path: bytes}; returns (compressed, uncompressed digest)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({os.path.dirname(p) for p in files if os.path.dirname(p)})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = MTIME
            tar.addfile(info)
        for path in sorted(files):
            data = files[path]
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = MTIME
            tar.addfile(info, io.BytesIO(data))
    uncompressed = raw.getvalue()
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=9) as g:
        g.write(uncompressed)
    return gz.getvalue(), "sha256:" + hashlib.sha256(uncompressed).hexdigest()


def image(layout, name, arch, text, variant=None):
    """Write one single-platform image (layer, config, manifest); return the manifest descriptor."""
    layer, diff_id = layer_tar({
        "hello.txt": text.encode(),
        "etc/regmirror-e2e/" + name: ("%s %s\n" % (name, arch)).encode(),
    })
    layer_desc = layout.blob(layer, OCI_LAYER)
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/hello"], "Env": ["PATH=/"], "Labels": {"regmirror.e2e": name}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "make_images.py " + name}],
    }
    if variant:
        config["variant"] = variant
    config_desc = layout.json_blob(config, OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": [layer_desc],
        "annotations": {"org.opencontainers.image.title": name},
    }
    platform = {"architecture": arch, "os": "linux"}
    if variant:
        platform["variant"] = variant
    return layout.json_blob(manifest, OCI_MANIFEST, platform=platform)


def single(out, name, tag, text):
    layout = Layout(os.path.join(out, name))
    desc = image(layout, name, "amd64", text)
    desc.pop("platform")
    layout.write_index(desc, tag)
    return desc["digest"]


def multi(out, name, tag):
    layout = Layout(os.path.join(out, name))
    manifests = [
        image(layout, name, "amd64", "%s for amd64\n" % name),
        image(layout, name, "arm64", "%s for arm64\n" % name, variant="v8"),
    ]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    desc = layout.json_blob(index, OCI_INDEX)
    layout.write_index(desc, tag)
    return desc["digest"]


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_images.py OUTDIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    print("hello latest", single(out, "hello", "latest", "hello from the regmirror e2e suite\n"))
    print("multi latest", multi(out, "multi", "latest"))
    print("multilist latest", multi(out, "multilist", "latest"))
    print("tool 1.0", single(out, "tool", "1.0", "a tool image on the ghcr.io upstream\n"))


if __name__ == "__main__":
    main()
