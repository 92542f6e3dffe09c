"""Download one sdist from the package index, checked against the index's sha256 (and ours).

Run: python3 build/fetch_sdist.py NAME VERSION DEST_DIR [--sha256 HEX]
Prints the path of the file. Index: $PIP_INDEX_URL, else https://pypi.org/simple (the PEP 691
JSON form of the simple API, with the HTML form as fallback).

Why not `pip download --no-binary`: pip prepares the sdist's metadata first, which for vLLM means
installing its build requirements (torch == 2.13.0 from the index: a CUDA build on aarch64) and
running setup.py, whose "0.32.0+cpu" version pip then rejects as inconsistent with "0.32.0".
Fetching the file the index lists is all we need.
"""

import argparse
import hashlib
import html.parser
import json
import os
import re
import sys
import urllib.parse
import urllib.request

__all__ = ["find_sdist", "fetch", "main"]

_JSON = "application/vnd.pypi.simple.v1+json"


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def find_sdist(index: str, name: str, version: str) -> tuple[str, str | None]:
    """(url, sha256 or None) of NAME-VERSION.tar.gz on the index."""
    page = f"{index.rstrip('/')}/{_norm(name)}/"
    req = urllib.request.Request(page, headers={"Accept": f"{_JSON}, text/html;q=0.1"})
    with urllib.request.urlopen(req, timeout=60) as r:
        ctype, body = r.headers.get("Content-Type", ""), r.read()
    wanted = {f"{n}-{version}.tar.gz" for n in (name, name.replace("-", "_"), _norm(name).replace("-", "_"))}
    if ctype.startswith(_JSON):
        for f in json.loads(body)["files"]:
            if f["filename"] in wanted:
                return urllib.parse.urljoin(page, f["url"]), f.get("hashes", {}).get("sha256")
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        for href in parser.links:
            url, _, frag = urllib.parse.urljoin(page, href).partition("#")
            if os.path.basename(urllib.parse.urlparse(url).path) in wanted:
                return url, frag[len("sha256="):] if frag.startswith("sha256=") else None
    raise LookupError(f"{page} lists no sdist for {name} {version} (looked for {', '.join(sorted(wanted))})")


def fetch(name: str, version: str, dest: str, sha256: str | None = None, index: str | None = None) -> str:
    index = index or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
    url, listed = find_sdist(index, name, version)
    if sha256 and listed and listed != sha256:
        raise ValueError(f"the index lists sha256 {listed} for {url}, our pin says {sha256}")
    os.makedirs(dest, exist_ok=True)
    out = os.path.join(dest, os.path.basename(urllib.parse.urlparse(url).path))
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as r, open(out + ".part", "wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    got = digest.hexdigest()
    for label, want in (("the index", listed), ("our pin", sha256)):
        if want and got != want:
            os.unlink(out + ".part")
            raise ValueError(f"{url}: sha256 {got} differs from {label} ({want})")
    os.replace(out + ".part", out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("dest")
    p.add_argument("--sha256")
    a = p.parse_args(argv)
    try:
        print(fetch(a.name, a.version, a.dest, a.sha256))
    except (OSError, LookupError, ValueError) as exc:
        print(f"fetch_sdist.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
