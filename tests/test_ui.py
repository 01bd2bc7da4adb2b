"""The "your data" page at /ui/, in a real headless browser against a real `memfleet serve` and workers.

Debian's `chromium` (installed by .ci/run) is driven by Playwright's Python package through
`executable_path`; no browser of Playwright's own is used. Without chromium the browser tests
skip, except in CI (`CI` set), where they fail.

`MEMFLEET_UI_SCREENSHOT=docs/ui.png` makes the user test save its screenshot of the signed-in
page there (that is how docs/ui.png is made).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Dialog, Locator, Page, Request, async_playwright, expect

from producer.client import Memfleet
from producer.http.apikeys import KeyStore
from producer.http.ui import CSP
from tests.http_support import ApiServer, token
from tests.support import uid

XSS = "<img src=x onerror=alert(1)>"
TEXTS = [
    "I moved to Porto in March.",
    "My sister lives in Braga.",
    "I run on Sundays.",
    "I am allergic to peanuts.",
    "My favourite book is Dune.",
    "I work night shifts as a nurse.",
    "We adopted a cat called Miso.",
    "I am learning Portuguese on Tuesdays.",
    "My dentist appointment is in January.",
    "I prefer tea to coffee.",
    "I play the cello in a quartet.",
    XSS,
]

expect.set_options(timeout=15_000)


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable)
        try:
            yield launched
        finally:
            await launched.close()


async def new_key(fleet: Memfleet, user: str | None = None, ttl: float | None = None) -> str:
    _, key = await KeyStore(fleet.redis).create(uid("ui"), user_id=user, ttl=ttl, rate_limit=10_000)
    return key


class Watch:
    """Everything the page asked for, went to and popped up, recorded as it happens."""

    def __init__(self, page: Page) -> None:
        self.requests: list[Request] = []
        self.visited: list[str] = []
        self.dialogs: list[str] = []
        page.on("request", lambda request: self.requests.append(request))
        page.on("framenavigated", lambda frame: self.visited.append(frame.url))
        page.on("dialog", self._dialog)

    async def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    async def check(self, origin: str, key: str) -> None:
        """Every request went to `origin` alone, no URL held the key, and /api saw it as the header."""
        secret = key.rsplit(".", 1)[-1]
        assert self.requests, "the page made no request"
        for request in self.requests:
            url = request.url.removeprefix("blob:")  # a blob: URL is named after the page's origin
            parts = urlsplit(url)
            assert f"{parts.scheme}://{parts.netloc}" == origin, f"a request left the origin: {request.url}"
            if parts.path.startswith("/api/"):
                assert (await request.all_headers()).get("authorization") == f"Token {key}", request.url
        for url in [r.url for r in self.requests] + self.visited:
            assert secret not in url, "the key appeared in a URL"
        assert self.dialogs == [], f"the page raised dialogs: {self.dialogs}"


async def open_page(browser: Browser, server: ApiServer) -> tuple[Page, Watch]:
    context = await browser.new_context(timezone_id="UTC", locale="en-US", viewport={"width": 900, "height": 800})
    page = await context.new_page()
    watch = Watch(page)
    response = await page.goto(f"{server.url}/ui/")
    assert response is not None and response.status == 200
    headers = await response.all_headers()
    assert headers["content-security-policy"] == CSP
    policy = dict(part.strip().split(" ", 1) for part in CSP.split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert "unsafe" not in CSP and "*" not in CSP and "http" not in CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    return page, watch


async def sign_in(page: Page, key: str) -> None:
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def memory_item(page: Page, text: str) -> Locator:
    return page.locator("#list > li").filter(has=page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$")))


async def shown_texts(page: Page) -> list[str]:
    return await page.locator("#list .text").all_text_contents()


async def test_a_user_key_sees_changes_exports_and_forgets_its_own_memories(
    fleet: Memfleet, api_server: ApiServer, browser: Browser, tmp_path: Path
) -> None:
    user = uid("alice")
    key = await new_key(fleet, user)
    async with httpx.AsyncClient(base_url=api_server.url, headers=token(key), timeout=60) as http:
        added = await http.post("/api/memories", json={"messages": [{"role": "user", "content": t} for t in TEXTS]})
        assert added.status_code == 200 and added.json()["outcome"]["stored"] == len(TEXTS)

        page, watch = await open_page(browser, api_server)
        await sign_in(page, key)
        await expect(page.get_by_role("heading", name=f"Memories of {user}")).to_be_visible()
        await expect(page.locator("#who")).to_have_text(re.compile(f"user key for {re.escape(user)}$"))
        await expect(page.locator("#fleet")).to_be_hidden()  # fleet figures are for app keys
        await expect(page.locator("#list > li")).to_have_count(len(TEXTS))  # 25 a page by default

        # A page at a time: 10, then the other 2.
        await page.get_by_label("Per page").select_option("10")
        await expect(page.locator("#list-caption")).to_have_text("Page 1: 10 memories.")
        first = await shown_texts(page)
        await page.get_by_role("button", name="Next page").click()
        await expect(page.locator("#list-caption")).to_have_text("Page 2: 2 memories.")
        await expect(page.get_by_role("button", name="Next page")).to_be_disabled()
        second = await shown_texts(page)
        assert sorted(first + second) == sorted(TEXTS)
        await page.get_by_role("button", name="Previous page").click()
        await expect(page.locator("#list-caption")).to_have_text("Page 1: 10 memories.")

        # The markup in a memory is shown as text: no element made of it, no alert.
        await page.get_by_label("Per page").select_option("25")
        await expect(page.get_by_text(XSS, exact=True)).to_be_visible()
        assert await page.locator("img").count() == 0

        # Search, then edit what it found.
        await page.get_by_role("searchbox", name="Search").fill("Where did I move in March?")
        await page.get_by_role("button", name="Search", exact=True).click()
        await expect(page.locator("#list-caption")).to_contain_text("for “Where did I move in March?”")
        await expect(page.locator("#list .text").first).to_have_text("I moved to Porto in March.")
        porto = memory_item(page, "I moved to Porto in March.")
        porto_id = await porto.get_attribute("data-id")
        await porto.get_by_role("button", name="Edit").click()
        await porto.get_by_label("Text").fill("I moved to Lisbon in March.")
        await porto.get_by_role("button", name="Save text").click()
        await expect(page.locator("#status")).to_have_text("Saved the new text.")
        assert (await http.get(f"/api/memories/{porto_id}")).json()["text"] == "I moved to Lisbon in March."
        await page.get_by_role("button", name="Show all").click()
        await expect(page.get_by_text("I moved to Lisbon in March.", exact=True)).to_be_visible()

        # Expiry: set (the page's time zone is UTC here), shown, then cleared.
        sundays = memory_item(page, "I run on Sundays.")
        sundays_id = await sundays.get_attribute("data-id")
        when = (dt.datetime.now(dt.UTC) + dt.timedelta(days=2)).replace(second=0, microsecond=0)
        await sundays.get_by_role("button", name="Expiry").click()
        await sundays.get_by_label("Expires at").fill(when.strftime("%Y-%m-%dT%H:%M"))
        await sundays.get_by_role("button", name="Save expiry").click()
        await expect(page.locator("#status")).to_contain_text("now expires")
        stored = (await http.get(f"/api/memories/{sundays_id}")).json()["expires_at"]
        assert dt.datetime.fromisoformat(stored) == when
        await expect(sundays.locator(".expiry time")).to_have_attribute(
            "datetime", when.strftime("%Y-%m-%dT%H:%M:00.000Z"))
        if os.environ.get("MEMFLEET_UI_SCREENSHOT"):
            await page.screenshot(path=os.environ["MEMFLEET_UI_SCREENSHOT"], full_page=True)
        await sundays.get_by_role("button", name="Expiry").click()
        await sundays.get_by_role("button", name="Never expire").click()
        await expect(page.locator("#status")).to_have_text("The memory no longer expires.")
        assert (await http.get(f"/api/memories/{sundays_id}")).json()["expires_at"] is None
        await expect(sundays.locator(".expiry")).to_have_text("no expiry")

        # Delete one, after saying yes in the page's own dialog (Cancel first: nothing goes).
        tea = memory_item(page, "I prefer tea to coffee.")
        tea_id = await tea.get_attribute("data-id")
        confirm = page.get_by_role("dialog", name="Delete this memory?")
        await tea.get_by_role("button", name="Delete").click()
        await confirm.get_by_role("button", name="Cancel").click()
        await expect(confirm).to_be_hidden()
        assert (await http.get(f"/api/memories/{tea_id}")).status_code == 200
        await tea.get_by_role("button", name="Delete").click()
        await expect(confirm.locator(".preview")).to_have_text("I prefer tea to coffee.")
        await confirm.get_by_role("button", name="Delete").click()
        await expect(page.locator("#status")).to_have_text("Deleted the memory.")
        assert (await http.get(f"/api/memories/{tea_id}")).status_code == 404
        await expect(memory_item(page, "I prefer tea to coffee.")).to_have_count(0)
        await expect(page.locator("#list > li")).to_have_count(len(TEXTS) - 1)

        # The export, as a file named for the user.
        remaining = sorted({*TEXTS, "I moved to Lisbon in March."} - {"I moved to Porto in March.",
                                                                      "I prefer tea to coffee."})
        async with page.expect_download() as started:
            await page.get_by_role("button", name="Download export").click()
        download = await started.value
        assert download.suggested_filename == f"memfleet-{user}.jsonl"
        saved = tmp_path / download.suggested_filename
        await download.save_as(saved)
        lines = [json.loads(line) for line in saved.read_text().splitlines()]
        assert sorted(line["text"] for line in lines) == remaining
        assert {line["user_id"] for line in lines} == {user}

        # Forget everything: only once the user id is typed (Escape first: nothing goes).
        forget = page.get_by_role("dialog", name=f"Forget everything of {user}?")
        await page.get_by_role("button", name="Forget everything…").click()
        await expect(forget).to_be_visible()
        await page.keyboard.press("Escape")
        await expect(forget).to_be_hidden()
        assert len((await http.get("/api/memories")).json()["memories"]) == len(remaining)
        await page.get_by_role("button", name="Forget everything…").click()
        go = forget.get_by_role("button", name="Forget everything")
        await expect(go).to_be_disabled()
        await forget.get_by_label("Type the user id to confirm").fill(user + "x")
        await expect(go).to_be_disabled()
        await forget.get_by_label("Type the user id to confirm").fill(user)
        await go.click()
        await expect(page.locator("#status")).to_have_text(
            f"Forgot everything of {user}: {len(remaining)} memories deleted.")
        await expect(page.locator("#list-caption")).to_have_text("No memories.")
        assert (await http.get("/api/memories")).json()["memories"] == []

        # An inline script put into the page does not run; the policy reports it.
        ran = await page.evaluate("""() => new Promise((resolve) => {
            document.addEventListener("securitypolicyviolation",
                (e) => resolve({ran: window.inlineRan === true, directive: e.effectiveDirective}), {once: true});
            const script = document.createElement("script");
            script.append(document.createTextNode("window.inlineRan = true"));
            document.body.append(script);
        })""")
        assert ran["ran"] is False and ran["directive"] in ("script-src-elem", "require-trusted-types-for"), ran
        assert await page.evaluate("() => window.inlineRan === undefined")
        refused = await page.evaluate("""() => {
            try { document.body.insertAdjacentHTML("beforeend", "<b>x</b>"); return false; }
            catch (e) { return e instanceof TypeError; }
        }""")
        assert refused, "a string became HTML despite the policy's Trusted Types"

        await watch.check(api_server.url, key)

        # Signing out drops the key and the data shown.
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_label("API key")).to_be_visible()
        assert await page.evaluate("() => sessionStorage.length") == 0
        assert await page.locator("#list > li").count() == 0


async def test_an_app_key_picks_a_user_and_sees_the_fleet(
    fleet: Memfleet, api_server: ApiServer, browser: Browser
) -> None:
    user = uid("ui-picked")
    key = await new_key(fleet)
    async with httpx.AsyncClient(base_url=api_server.url, headers=token(key), timeout=60) as http:
        added = await http.post("/api/memories", json={"user_id": user, "messages": [
            {"role": "user", "content": "I keep bees on the roof."},
            {"role": "user", "content": "My bees made 12 kg of honey this year."}]})
        assert added.status_code == 200

        page, watch = await open_page(browser, api_server)
        await page.get_by_label("API key").fill(key)
        await page.keyboard.press("Enter")  # from the keyboard alone
        await expect(page.locator("#who")).to_have_text(re.compile("app key$"))
        await expect(page.get_by_role("heading", name="Fleet", exact=True)).to_be_visible()
        workers = page.locator('[data-stat="workers"]')
        await expect(workers).to_have_text(re.compile(r"^[1-9]\d*$"))
        stats = (await http.get("/api/stats")).json()
        assert int(await workers.text_content() or "") == len(stats["workers"]) >= 1
        for stat in ("queued-bulk", "queued-interactive", "dead-letters", "in-progress"):
            await expect(page.locator(f'[data-stat="{stat}"]')).to_have_text(re.compile(r"^\d+$"))
        # Encoder use: a row per live worker and encoder, named as /api/stats names the workers.
        rows = page.locator("#encoder-rows tr")
        await expect(rows.first.locator("th")).to_have_text(re.compile(r".+:\d+$"))
        assert set(await rows.locator("th").all_text_contents()) <= set(stats["workers"])

        await expect(page.get_by_label("User id", exact=True)).to_be_focused()
        await page.keyboard.type(user)
        await page.keyboard.press("Enter")
        await expect(page.get_by_role("heading", name=f"Memories of {user}")).to_be_visible()
        await expect(page.locator("#list > li")).to_have_count(2)
        assert sorted(await shown_texts(page)) == ["I keep bees on the roof.", "My bees made 12 kg of honey this year."]
        listed = [r.url for r in watch.requests if urlsplit(r.url).path == "/api/memories"]
        assert listed and all(parse_qs(urlsplit(url).query)["user_id"] == [user] for url in listed)

        # Another user: only theirs (none), never the last one's.
        await page.get_by_label("User id", exact=True).fill(uid("ui-nobody"))
        await page.get_by_role("button", name="Open").click()
        await expect(page.locator("#list-caption")).to_have_text("No memories.")
        assert await page.locator("#list > li").count() == 0

        # A bad user id: the server's reason, as text, and nothing of the user before stays shown.
        await page.get_by_label("User id", exact=True).fill("no such user!")
        await page.get_by_role("button", name="Open").click()
        await expect(page.get_by_role("alert")).to_contain_text("user_id has a character that is not allowed")
        await expect(page.locator("#memories")).to_be_hidden()
        assert await page.locator("#list > li").count() == 0

        await watch.check(api_server.url, key)


async def test_the_page_needs_no_key_and_the_gate_lets_nothing_else_through(
    fleet: Memfleet, api_server: ApiServer
) -> None:
    user = uid("ui-who")
    user_key, app_key = await new_key(fleet, user, ttl=3600), await new_key(fleet)
    async with httpx.AsyncClient(base_url=api_server.url, timeout=60) as http:
        for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
            for method in ("GET", "HEAD"):
                answer = await http.request(method, path)
                assert answer.status_code == 200, (method, path)
                assert answer.headers["content-type"].startswith(kind)
                assert answer.headers["content-security-policy"] == CSP
                assert answer.headers["x-content-type-options"] == "nosniff"
        moved = await http.get("/ui")
        assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
        for path in ("/ui/index.html", "/ui/app.js/", "/ui/static/app.js", "/ui/x", "/uix", "/ui/..%2fapi/whoami",
                     "/api/whoami", "/api/encoders", "/"):
            assert (await http.get(path)).status_code == 401, path

        me = await http.get("/api/whoami", headers=token(user_key))
        assert me.status_code == 200
        assert me.json()["kind"] == "user" and me.json()["user_id"] == user
        expires = dt.datetime.fromisoformat(me.json()["expires_at"]) - dt.datetime.now(dt.UTC)
        assert dt.timedelta(minutes=55) < expires <= dt.timedelta(hours=1)
        assert set(me.json()) == {"kind", "name", "user_id", "expires_at"}
        assert user_key.rsplit(".", 1)[-1] not in me.text
        app = (await http.get("/api/whoami", headers=token(app_key))).json()
        assert (app["kind"], app["user_id"], app["expires_at"]) == ("app", None, None)

        assert (await http.get("/api/encoders", headers=token(user_key))).status_code == 403
        encoders = await http.get("/api/encoders", headers=token(app_key))
        assert encoders.status_code == 200
        assert all(set(use) == {"bulk", "query", "search"} for use in encoders.json().values())
