"""The "your data" page at /ui/: three static files shipped in the package, and the headers that
keep the page to itself.

The files hold no data, so they need no key: `KeyGate` lets exactly `PATHS` through and nothing
else. All the page shows it fetches from /api with the key a person pasted, sent as the
Authorization header, never in a URL. The Content-Security-Policy allows this origin only, no
inline script and no HTML from strings (Trusted Types), so a memory whose text looks like markup
stays text even if some code path were to treat it as HTML.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import resources

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    # Assigning a string to innerHTML, outerHTML, insertAdjacentHTML or document.write throws.
    "require-trusted-types-for 'script'",
    "trusted-types 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated each time: a new release shows at once
}
FILES = {
    "/ui/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/app.css": ("app.css", "text/css; charset=utf-8"),
}
PATHS = frozenset({"/ui", *FILES})


@functools.cache
def _content(name: str) -> bytes:
    return resources.files("producer.http").joinpath("static", name).read_bytes()


def _serve(name: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return Response(_content(name), media_type=media_type, headers=HEADERS)

    return endpoint


async def _to_index(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=308, headers=HEADERS)


def routes() -> list[BaseRoute]:
    return [Route("/ui", _to_index, methods=["GET", "HEAD"]),
            *(Route(path, _serve(name, media_type), methods=["GET", "HEAD"])
              for path, (name, media_type) in FILES.items())]
