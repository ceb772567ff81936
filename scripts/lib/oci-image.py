#!/usr/bin/env python3
"""Write a two-layer OCI image archive (for `ctr images import`) built from busybox-static,
with no network: layer 1 holds /bin/busybox and its applet links, layer 2 a file that tells
which layer made it. The digests are computed here; tar members have fixed times and owners,
so the same busybox gives the same image.

    oci-image.py BUSYBOX OUTPUT.tar REF
"""
import hashlib
import io
import json
import sys
import tarfile

APPLETS = ["sh", "echo", "cat", "ls", "mount", "df", "uname", "true"]


def member(name, data=None, mode=0o644, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.linkname = link
    info.size = len(data) if data is not None else 0
    return info, (io.BytesIO(data) if data is not None else None)


def layer(members):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return out.getvalue()


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    busybox_path, output, ref = sys.argv[1:4]
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    base = [member("bin/", kind=tarfile.DIRTYPE, mode=0o755), member("bin/busybox", busybox, 0o755)]
    base += [member("bin/" + a, kind=tarfile.SYMTYPE, mode=0o777, link="busybox") for a in APPLETS]
    for d in ["proc/", "sys/", "dev/", "etc/", "tmp/"]:
        base.append(member(d, kind=tarfile.DIRTYPE, mode=0o755))
    top = [member("etc/thinstack-layer", b"made by layer 2 of the thinstack test image\n")]
    layers = [layer(base), layer(top)]
    config = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [blob(l) for l in layers]},
        "history": [{"created_by": "busybox-static"}, {"created_by": "thinstack marker"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": blob(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": blob(l), "size": len(l)} for l in layers],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": blob(manifest), "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": ref,
                                       "io.containerd.image.name": ref},
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }, sort_keys=True).encode()
    with tarfile.open(output, "w", format=tarfile.PAX_FORMAT) as tar:
        entries = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)]
        entries += [("blobs/sha256/" + blob(b)[7:], b) for b in [config, manifest] + layers]
        for name, data in entries:
            info, stream = member(name, data)
            tar.addfile(info, stream)


if __name__ == "__main__":
    main()
