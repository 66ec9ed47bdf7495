"""Check a built MkDocs site for broken local links and missing images.

    python tools/check_site.py site/

Every href and src in every page that points inside the site (not http:,
mailto: or a bare #anchor) must name a file that exists, and every image
must be one; an anchor (#name) on another page must be an id on that page.
Exits non-zero, listing what is broken. (MkDocs --strict checks the
Markdown's links; this checks what the theme and the pages actually emit.)
"""
import html.parser
import pathlib
import sys
import urllib.parse


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        for name in ("href", "src"):
            if attrs.get(name):
                self.links.append((tag, attrs[name]))


def _parse(path):
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(__doc__)
    site = pathlib.Path(argv[0]).resolve()
    pages = sorted(site.rglob("*.html"))
    if not pages:
        sys.exit(f"{site}: no .html pages: build the site first (mkdocs build -d {site})")
    parsed = {page: _parse(page) for page in pages}
    broken = []
    for page, parser in parsed.items():
        for tag, link in parser.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or url.netloc or link.startswith(("#", "mailto:", "data:")):
                continue
            path = urllib.parse.unquote(url.path)
            # a path from the root (the 404 page's) is from the site's root
            target = (site / path.lstrip("/") if path.startswith("/") else page.parent / path).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: <{tag}> {link} -> missing {target}")
            elif url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if url.fragment not in ids:
                    broken.append(f"{page.relative_to(site)}: {link}: no id {url.fragment!r}")
    for line in broken:
        print(line)
    print(f"{len(pages)} pages checked, {len(broken)} broken links or images")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
