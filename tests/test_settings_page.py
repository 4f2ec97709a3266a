"""The settings page in real headless Chromium (Debian's ``chromium``), driven by playwright.

Playwright only drives the browser: it uses ``/usr/bin/chromium`` and downloads nothing. Where
Chromium or playwright is missing, the tests skip and say why; with ``BYOK_REQUIRE_BROWSER=1``
(for ``.ci/run``, which installs Chromium) they fail instead.
Each state is saved as a screenshot under ``test-artifacts/settings-page/``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from byok_hookspecs import Actor
from clock_support import ShiftedClock
from server_support import (
    ADMIN,
    ADMIN_TOKEN,
    MEMBER,
    MEMBER_TOKEN,
    Serve,
    Stack,
    live_server,
    make_stack,
    master_key_value,
    random_key,
    serve_environment,
)

from byok_plugin.app import utc_now
from byok_plugin.server import BearerTokens, LocalLogin, create_app
from byok_plugin.server.local import create_local_app

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("BYOK_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "settings-page"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXPECTED_HTTP_ERROR = re.compile(
    r"Failed to load resource: the server responded with a status of (401|409|422)\b"
)


@dataclass
class Clock:
    """Monotonic seconds the test moves on by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def _browser_unavailable(reason: str) -> None:
    """Skip, on a laptop without Chromium; fail where it is required (BYOK_REQUIRE_BROWSER=1)."""
    if os.environ.get("BYOK_REQUIRE_BROWSER") == "1":
        pytest.fail(f"headless Chromium is required here (BYOK_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        _browser_unavailable(
            f"headless Chromium not found at {CHROMIUM}: apt-get install chromium "
            "(.ci/run installs it), or set BYOK_TEST_CHROMIUM"
        )
    try:
        from playwright import sync_api
    except ImportError:
        _browser_unavailable("playwright is not installed (pip install -e '.[dev]')")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        # a fresh user-data-dir per run: a persistent context is the way to give one
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=LAUNCH_ARGS,
            viewport={"width": 1100, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, sqlite_url: str) -> Iterator[Stack]:
    """The app on the wall clock, or on the clock a test passes (indirect parameter "stack")."""
    clock = getattr(request, "param", utc_now)
    built = make_stack(tmp_path, sqlite_url, master_keys=master_key_value(), clock=clock)
    yield built
    built.app.close()


@pytest.fixture
def base_url(stack: Stack) -> Iterator[str]:
    identify = BearerTokens({ADMIN_TOKEN: ADMIN, MEMBER_TOKEN: MEMBER})
    with live_server(create_app(stack.app, identify=identify, pm=stack.pm)) as url:
        yield url


class Page:
    """One browser tab as one user, with its console errors and screenshots."""

    def __init__(self, context, token: str | None, name: str) -> None:
        self.page = context.new_page()
        self.name = name
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        if token is not None:
            self.page.set_extra_http_headers({"Authorization": f"Bearer {token}"})

    def _console(self, message) -> None:
        # an API error the page shows in place is not a page error; a script error or a
        # Content-Security-Policy violation is
        if message.type == "error" and not EXPECTED_HTTP_ERROR.match(message.text):
            self.errors.append(message.text)

    def shot(self, state: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{state}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def tabs(browser) -> Iterator[list[Page]]:
    opened: list[Page] = []
    yield opened
    for tab in opened:
        tab.close()


def open_page(browser, tabs: list[Page], base_url: str, token: str | None, name: str) -> Page:
    tab = Page(browser, token, name)
    tabs.append(tab)
    tab.page.goto(f"{base_url}/settings/?workspace=acme")
    return tab


def card(page, provider: str):
    return page.locator(f'article.provider[data-provider="{provider}"]')


def test_an_admin_adds_replaces_tests_disables_and_deletes_a_key(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    tab = open_page(browser, tabs, base_url, ADMIN_TOKEN, "admin")
    page = tab.page
    openai = card(page, "openai")
    expect(openai.get_by_role("heading", name="OpenAI")).to_be_visible()
    expect(page.locator("#whoami")).to_contain_text("alice")
    expect(page.locator("#whoami")).to_contain_text("Admin")
    # the host signs its users in and out, not this page
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
    expect(openai.locator(".empty")).to_contain_text("No key yet")
    tab.shot("1-empty")

    # add, with the keyboard only: focus the button, Enter, type, Enter
    first = random_key("openai")
    page.get_by_role("button", name="Add OpenAI key").focus()
    page.keyboard.press("Enter")
    key_input = openai.get_by_label("API key")
    expect(key_input).to_be_focused()
    expect(key_input).to_have_attribute("type", "password")
    page.keyboard.type(first)
    tab.shot("2-adding")
    page.keyboard.press("Enter")
    hint = openai.locator(".key-hint")
    expect(hint).to_have_text(f"{first[:6]}...{first[-4:]}")
    expect(page.locator("#notice")).to_contain_text("Saved the OpenAI key")
    expect(openai.locator(".status-pill")).to_have_text("Enabled")
    expect(openai.locator(".key-meta")).to_contain_text("Never used")
    assert first not in page.content()
    # focus lands on the new key's row, ready for the next action
    expect(openai.get_by_role("button", name="Replace OpenAI key “default”")).to_be_focused()
    tab.shot("3-added-masked")

    # an error shows in place, next to the field, and nothing is stored
    openai.get_by_role("button", name="Add OpenAI key").click()
    openai.get_by_label("API key").fill(random_key("anthropic"))
    openai.get_by_label("Label").fill("wrong")
    openai.get_by_role("button", name="Save key").click()
    field_error = openai.locator(".field-error")
    expect(field_error).to_be_visible()
    expect(field_error).to_contain_text("looks like an Anthropic key")
    expect(openai.get_by_label("API key")).to_have_attribute("aria-invalid", "true")
    tab.shot("4-error-in-place")
    openai.get_by_role("button", name="Cancel").click()
    expect(openai.locator(".key-form")).to_have_count(0)
    expect(openai.locator("li.key")).to_have_count(1)

    # replace
    second = random_key("openai")
    openai.get_by_role("button", name="Replace OpenAI key “default”").click()
    expect(openai.get_by_role("heading", name="Replace the OpenAI key “default”")).to_be_visible()
    openai.get_by_label("API key").fill(second)
    openai.get_by_role("button", name="Replace key").click()
    expect(hint).to_have_text(f"{second[:6]}...{second[-4:]}")
    expect(page.locator("#notice")).to_contain_text("Replaced the OpenAI key")
    expect(openai.locator("li.key")).to_have_count(1)
    tab.shot("5-replaced")

    # test, then a refusal shows in place
    openai.get_by_role("button", name="Test OpenAI key “default”").click()
    expect(openai.locator(".key-result")).to_have_text(
        "The provider accepted this key — the provider accepted the key"
    )
    stack.checker.refused.add(second)
    openai.get_by_role("button", name="Test OpenAI key “default”").click()
    expect(openai.locator(".key-result")).to_contain_text(
        "The provider refused this key — incorrect API key provided"
    )
    tab.shot("6-tested")

    # disable, enable
    openai.get_by_role("button", name="Disable OpenAI key “default”").click()
    expect(openai.locator(".status-pill")).to_have_text("Disabled")
    expect(openai.locator(".provider-meta")).to_contain_text("disabled")
    tab.shot("7-disabled")
    openai.get_by_role("button", name="Enable OpenAI key “default”").click()
    expect(openai.locator(".status-pill")).to_have_text("Enabled")

    # delete, after an inline confirmation (Cancel first: nothing happens)
    openai.get_by_role("button", name="Delete OpenAI key “default”").click()
    expect(openai.locator(".confirm")).to_be_visible()
    expect(openai.get_by_role("button", name="Cancel")).to_be_focused()
    tab.shot("8-confirm-delete")
    page.keyboard.press("Escape")
    expect(openai.locator(".confirm")).to_be_hidden()
    expect(openai.locator("li.key")).to_have_count(1)
    openai.get_by_role("button", name="Delete OpenAI key “default”").click()
    openai.get_by_role("button", name="Delete key").click()
    expect(openai.locator("li.key")).to_have_count(0)
    expect(openai.locator(".empty")).to_be_visible()
    expect(page.locator("#notice")).to_contain_text("Deleted the OpenAI key")
    tab.shot("9-deleted")

    actions = [e.action for e in stack.audit.events if e.actor_id == "alice"]
    assert actions[:2] == ["key.created", "key.replaced"]
    assert "key.deleted" in actions
    assert tab.errors == []


def test_a_member_sees_the_keys_without_any_edit_control(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    service = stack.app.key_service(stack.pm)
    service.set_key(ADMIN, "acme", "openai", random_key("openai"), label="default", test=False)
    service.set_key(ADMIN, "acme", "exa", random_key("exa"), label="search", test=False)
    service.disable(ADMIN, "acme", "exa")

    tab = open_page(browser, tabs, base_url, MEMBER_TOKEN, "member")
    page = tab.page
    expect(page.locator("li.key")).to_have_count(2)
    expect(page.locator("#readonly-note")).to_be_visible()
    expect(page.locator("#whoami")).to_contain_text("Member")
    expect(card(page, "exa").locator(".status-pill")).to_have_text("Disabled")
    # no button at all on the page's key list: no add, replace, test, disable or delete
    expect(page.locator("#providers").get_by_role("button")).to_have_count(0)
    for name in ("Add", "Replace", "Test", "Disable", "Enable", "Delete"):
        expect(page.get_by_role("button", name=re.compile(name))).to_have_count(0)
    tab.shot("read-only")
    assert tab.errors == []


def test_a_member_sees_the_keys_the_workspace_inherits_masked(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    from byok_plugin.resolution.organizations import org_owner

    operator = Actor("root", operator=True)
    orgs = stack.app.organizations(stack.pm)
    orgs.create(operator, "acme-org")
    orgs.attach(operator, "acme-org", "acme")
    secret = random_key("anthropic")
    stored = stack.app.key_service(stack.pm).set_key(
        operator, org_owner("acme-org"), "anthropic", secret, label="shared", test=False
    )

    tab = open_page(browser, tabs, base_url, MEMBER_TOKEN, "member")
    page = tab.page
    inherited = card(page, "anthropic").locator("li.key.inherited")
    expect(inherited).to_have_count(1)
    expect(inherited).to_contain_text("Inherited from organization acme-org")
    expect(inherited.locator(".key-hint")).to_have_text(stored.key.hint)
    expect(card(page, "anthropic").locator(".provider-meta")).to_contain_text(
        "Runs use the key of organization acme-org"
    )
    expect(inherited.get_by_role("button")).to_have_count(0)
    assert secret not in page.content()
    tab.shot("inherited")
    assert tab.errors == []


def test_without_an_identity_the_page_says_so(browser, tabs: list[Page], base_url: str) -> None:
    from playwright.sync_api import expect

    tab = open_page(browser, tabs, base_url, None, "anonymous")
    expect(tab.page.locator("#page-error")).to_contain_text("You are not signed in")
    expect(tab.page.locator("li.key")).to_have_count(0)
    tab.shot("not-signed-in")


def test_byok_serve_and_a_browser_at_the_printed_address_manage_the_default_store(
    browser, tabs: list[Page], tmp_path: Path
) -> None:
    """The issue's "done when": run byok serve, open the link it printed, manage a key."""
    from playwright.sync_api import expect

    serve = Serve(serve_environment(tmp_path), "--port", "0", "--workspace", "acme")
    api_key = random_key("mistral")
    try:
        url = serve.url()
        tab = Page(browser, None, "byok-serve")
        tabs.append(tab)
        page = tab.page
        page.goto(url)
        mistral = card(page, "mistral")
        expect(mistral.get_by_role("button", name="Add Mistral AI key")).to_be_visible()
        # the one-time token is gone from the address bar once used
        assert "#login" not in page.url
        expect(page.locator("#whoami")).to_contain_text("Local operator")
        # the session is in this origin's sessionStorage, sent as a header: no cookie at all
        assert browser.cookies() == []
        session = page.evaluate("sessionStorage.getItem('byok.session')")
        assert isinstance(session, str)
        assert len(session) >= 32
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()
        mistral.get_by_role("button", name="Add Mistral AI key").click()
        mistral.get_by_label("API key").fill(api_key)
        mistral.get_by_role("button", name="Save key").click()
        expect(mistral.locator(".key-hint")).to_have_text(f"{api_key[:6]}...{api_key[-4:]}")
        tab.shot("key-added")
        # the session survives a reload
        page.reload()
        expect(mistral.locator("li.key")).to_have_count(1)
        assert tab.errors == []

        # sign out: the page forgets the session and the server ends it
        page.get_by_role("button", name="Sign out").click()
        expect(page.locator("#notice")).to_contain_text("You are signed out")
        expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
        expect(mistral).to_have_count(0)
        assert page.evaluate("sessionStorage.getItem('byok.session')") is None
        tab.shot("signed-out")
        base = url.split("/settings/", 1)[0]
        replayed = httpx.get(f"{base}/api/byok/me", headers={"Authorization": f"Bearer {session}"})
        assert replayed.status_code == 401

        # the spent link does not sign anyone in again
        page.goto("about:blank")  # else the link is only a change of fragment: no new load
        page.goto(url)
        expect(page.locator("#page-error")).to_contain_text("already used")
        expect(mistral.locator("li.key")).to_have_count(0)
        tab.shot("link-already-used")
    finally:
        output = serve.stop()
    assert api_key not in output
    assert session not in output


def test_an_idle_session_ends_and_the_page_says_how_to_sign_in_again(
    browser, tabs: list[Page], stack: Stack
) -> None:
    from playwright.sync_api import expect

    clock = Clock()
    login = LocalLogin(Actor("local-operator", operator=True), clock=clock)
    with live_server(create_local_app(stack.app, login, pm=stack.pm)) as base:
        tab = Page(browser, None, "byok-serve")
        tabs.append(tab)
        page = tab.page
        page.goto(f"{base}/settings/?workspace=acme#login={login.issue_token()}")
        expect(page.get_by_role("button", name="Sign out")).to_be_visible()
        expect(card(page, "openai")).to_be_visible()
        clock.now += 12 * 3600 + 1
        page.reload()
        expect(page.locator("#page-error")).to_contain_text("Your session has ended")
        expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('byok.session')") is None
        tab.shot("session-ended")
    assert tab.errors == []


# what is spent is the month's, on the app's clock: no month may begin before the page shows it
@pytest.mark.parametrize("stack", [ShiftedClock()], indirect=True, ids=["shifted-clock"])
def test_a_member_sees_each_budget_with_spent_reserved_and_left(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from decimal import Decimal

    from byok_hookspecs import BudgetReservation, BudgetSettlement, CredentialSource
    from playwright.sync_api import expect

    stack.app.budgets.set_budget("acme", "monthly", limit="20")
    stack.app.budgets.set_budget("acme", "own-keys", limit="5", metric="list_cost", hard=False)
    held = BudgetReservation(
        "run:a:1", "acme", "openai", "gpt-4o-mini", CredentialSource.PLATFORM, Decimal("3")
    )
    stack.pm.hook.byok_reserve_budget(reservation=held)
    stack.pm.hook.byok_settle_budget(
        settlement=BudgetSettlement("run:a:1", "acme", Decimal("1.25"))
    )
    stack.pm.hook.byok_reserve_budget(
        reservation=BudgetReservation(
            "run:b:1", "acme", "openai", "gpt-4o-mini", CredentialSource.PLATFORM, Decimal("2")
        )
    )

    tab = open_page(browser, tabs, base_url, MEMBER_TOKEN, "member-budgets")
    page = tab.page
    monthly = page.locator('li.budget[data-budget="monthly"]')
    expect(monthly.locator(".budget-spent")).to_have_text("$1.25")
    expect(monthly.locator(".budget-reserved")).to_have_text("$2.00")
    expect(monthly.locator(".budget-left")).to_have_text("$16.75")
    expect(monthly.locator(".budget-kind")).to_have_text("Hard limit")
    expect(monthly.locator(".budget-meta")).to_have_text("$20.00 per month, platform charges")
    own = page.locator('li.budget[data-budget="own-keys"]')
    expect(own.locator(".budget-kind")).to_have_text("Soft limit")
    expect(own.locator(".budget-left")).to_have_text("$5.00")
    # a budget narrowed to a key that was then replaced says that it applies to no call
    service = stack.app.key_service(stack.pm)
    old = service.set_key(ADMIN, "acme", "openai", random_key("openai"), test=False).key.id
    stack.app.budgets.set_budget("acme", "guard", limit="1", metric="list_cost", key_id=old)
    service.set_key(ADMIN, "acme", "openai", random_key("openai"), test=False)
    page.reload()
    guard = page.locator('li.budget[data-budget="guard"]')
    expect(guard.locator(".budget-meta")).to_contain_text(
        f"key {old}, which no longer exists: applies to no call"
    )
    tab.shot("budgets")
    assert tab.errors == []


# --- accessibility helpers for the sections below ----------------------------------------------

CONTRAST_JS = """(selector) => {
  const parse = (c) => (c.match(/[\\d.]+/g) || []).slice(0, 3).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = getComputedStyle(el).backgroundColor;
      if (c && !c.startsWith("rgba(0, 0, 0, 0)") && c !== "transparent") return parse(c);
    }
    return [255, 255, 255];
  };
  return [...document.querySelectorAll(selector)].filter((el) => el.offsetParent !== null)
    .map((el) => {
      const a = lum(parse(getComputedStyle(el).color)), b = lum(background(el));
      return [el.textContent.trim().slice(0, 40), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
    });
}"""


def assert_readable(page, selector: str) -> None:
    """Every visible text matched has WCAG AA contrast (4.5:1) against what is behind it."""
    measured = page.evaluate(CONTRAST_JS, selector)
    assert measured, f"nothing visible matches {selector}"
    low = [(text, round(ratio, 2)) for text, ratio in measured if ratio < 4.5]
    assert low == []


def assert_fits_width(page) -> None:
    """Nothing makes the page scroll sideways (wide tables scroll inside their own region)."""
    overflow = page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0


def test_an_admin_reads_the_audit_log_newest_first_on_a_phone_and_in_dark_mode(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    service = stack.app.key_service(stack.pm)
    service.set_key(ADMIN, "acme", "openai", random_key("openai"), label="default", test=False)
    service.disable(ADMIN, "acme", "openai")
    with pytest.raises(Exception, match="may not"):
        service.set_key(MEMBER, "acme", "openai", random_key("openai"), test=False)

    tab = open_page(browser, tabs, base_url, ADMIN_TOKEN, "admin-audit")
    page = tab.page
    section = page.get_by_role("region", name="Audit log")
    expect(section).to_be_visible()
    rows = section.locator("tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator(".audit-what")).to_have_text("Access refusedRefused")
    expect(rows.nth(0).locator(".audit-who")).to_have_text("bob")
    expect(rows.nth(1).locator(".audit-what")).to_have_text("Key disabled")
    expect(rows.nth(2).locator(".audit-what")).to_have_text("Key added")
    expect(rows.nth(2).locator(".audit-who")).to_have_text("alice")
    expect(rows.nth(2).locator(".audit-key")).to_contain_text("openai · key_")
    for name in ("When", "What", "Who", "Key", "Details"):
        expect(section.get_by_role("columnheader", name=name)).to_be_visible()
    # the page's own change appears in the log without a reload
    card(page, "openai").get_by_role("button", name="Enable OpenAI key “default”").click()
    expect(rows).to_have_count(4)
    expect(rows.nth(0).locator(".audit-what")).to_have_text("Key enabled")
    assert_readable(page, ".audit-table th, .audit-table td, .audit-lede")
    tab.shot("audit")

    page.set_viewport_size({"width": 390, "height": 844})
    expect(rows).to_have_count(4)
    assert_fits_width(page)
    # the table scrolls inside its own region, which a keyboard user can reach
    scroller = page.locator("#audit-scroll")
    scroller.focus()
    expect(scroller).to_be_focused()
    tab.shot("audit-390px")

    page.emulate_media(color_scheme="dark")
    assert_readable(page, ".audit-table th, .audit-table td, .audit-lede, h2")
    tab.shot("audit-390px-dark")
    page.set_viewport_size({"width": 1100, "height": 900})
    tab.shot("audit-dark")
    page.emulate_media(color_scheme="light")
    assert tab.errors == []


def test_a_member_sees_no_audit_log(browser, tabs: list[Page], base_url: str, stack: Stack) -> None:
    from playwright.sync_api import expect

    service = stack.app.key_service(stack.pm)
    service.set_key(ADMIN, "acme", "openai", random_key("openai"), test=False)
    tab = open_page(browser, tabs, base_url, MEMBER_TOKEN, "member-audit")
    expect(tab.page.locator("li.key")).to_have_count(1)
    expect(tab.page.locator("#audit-section")).to_be_hidden()
    expect(tab.page.locator("#audit-rows tr")).to_have_count(0)
    # and the member's page asked for nothing it may not read
    assert [e for e in stack.audit.events if e.action == "access.denied"] == []
    assert tab.errors == []


def _ledger_call(
    now: datetime, n: int, days_ago: int, *, own: bool, cost: str, model: str = "gpt-4o"
):
    from datetime import timedelta
    from decimal import Decimal

    from byok_hookspecs import Charge, CredentialSource, Usage, UsageRecord

    return UsageRecord(
        idempotency_key=f"run-{n}:block-{n}:attempt-1",
        workspace_id="acme",
        usage=Usage("openai", model, input_tokens=1000, output_tokens=100),
        charge=Charge(
            amount=Decimal(0) if own else Decimal(cost),
            reason="byok" if own else "platform",
            list_cost=Decimal(cost),
            breakdown=(("input", Decimal(cost)),),
            price_version="test-1",
        ),
        source=CredentialSource.WORKSPACE if own else CredentialSource.PLATFORM,
        key_id="key_own0000001" if own else None,
        workflow_id="support-triage",
        run_id=f"run-{n}",
        block_id="summarize" if own else "classify",
        attempt=1,
        occurred_at=now - timedelta(days=days_ago),
    )


# the page's "today" is the app's: calls made "today" must not land on yesterday at midnight
@pytest.mark.parametrize("stack", [ShiftedClock()], indirect=True, ids=["shifted-clock"])
def test_an_admin_sees_usage_as_a_chart_and_changes_the_fallback_policy(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    now = stack.app.clock()
    stack.app.ledger.record(_ledger_call(now, 1, 0, own=True, cost="1.50"))
    stack.app.ledger.record(_ledger_call(now, 2, 0, own=False, cost="0.50", model="gpt-4o-mini"))
    stack.app.ledger.record(_ledger_call(now, 3, 3, own=True, cost="2.25"))
    stack.app.ledger.record(_ledger_call(now, 4, 45, own=False, cost="99"))  # not in the 30 days

    tab = open_page(browser, tabs, base_url, ADMIN_TOKEN, "admin-usage")
    page = tab.page
    usage = page.get_by_role("region", name="Usage, last 30 days")
    expect(usage).to_be_visible()
    expect(page.locator("#usage-byok")).to_have_text("$3.75")
    expect(page.locator("#usage-platform")).to_have_text("$0.50")
    expect(page.locator("#usage-saved")).to_have_text("$3.75")
    expect(page.locator("#usage-share")).to_have_text("2 of 3")
    # the chart: one group per day, bars only where something was spent, stacked
    chart = page.locator("#usage-chart svg")
    expect(chart).to_have_attribute("role", "img")
    expect(chart.locator("g.bar")).to_have_count(30)
    expect(chart.locator("rect.bar-byok")).to_have_count(2)
    expect(chart.locator("rect.bar-platform")).to_have_count(1)
    today = chart.locator("g.bar").last
    own_top = float(today.locator("rect.bar-byok").get_attribute("y"))
    platform = today.locator("rect.bar-platform")
    # the platform's part sits on top of the own keys' part
    assert float(platform.get_attribute("y")) + float(platform.get_attribute("height")) == (
        pytest.approx(own_top)
    )
    title = page.locator("#usage-chart-title")
    expect(title).to_contain_text("2 days with spend")
    assert page.locator("script[src^='http'], link[href^='http']").count() == 0  # no CDN
    models = page.locator("#usage-models tr")
    expect(models).to_have_count(2)
    expect(models.first).to_contain_text("gpt-4o")
    expect(models.first).to_contain_text("$3.75")
    blocks = page.locator("#usage-blocks tr")
    expect(blocks).to_have_count(2)
    expect(blocks.first).to_contain_text("support-triage")
    expect(blocks.first).to_contain_text("summarize")
    expect(blocks.first).to_contain_text("key_own0000001")
    expect(blocks.last).to_contain_text("platform’s key")
    assert_readable(
        page, "#usage-section dt, #usage-section dd, #usage-section td, .chart-box text"
    )
    tab.shot("usage")

    # the fallback policy: shown, and an admin changes it
    fallback = page.get_by_role("region", name="When an own key fails")
    expect(fallback.locator("#fallback-current")).to_contain_text("Never")
    fallback.get_by_label("Only when the provider’s rate limit or quota is hit").check()
    fallback.get_by_role("button", name="Save").click()
    expect(fallback.locator("#fallback-current")).to_contain_text("rate limit or quota")
    expect(fallback.locator("#fallback-current")).to_contain_text("Set by alice")
    notice = page.locator("#notice")
    expect(notice).to_contain_text("Fallback saved")
    expect(notice).to_be_in_viewport()
    assert stack.app.workspace_settings.fallback_policy("acme").value == "on_rate_limit"
    expect(page.locator("#audit-rows tr").first.locator(".audit-what")).to_have_text(
        "Fallback policy changed"
    )
    tab.shot("fallback-saved")

    page.set_viewport_size({"width": 390, "height": 844})
    # the page draws the chart again at its new width (on "resize"): wait for that drawing, not
    # the one the resize is replacing (seen once under load: the old one was gone, box None)
    page.wait_for_function(
        "() => { const r = document.querySelector('#usage-chart svg')?.getBoundingClientRect();"
        " return !!r && r.width > 0 && r.width <= 390; }"
    )
    expect(chart.locator("g.bar")).to_have_count(30)
    assert_fits_width(page)
    box = chart.bounding_box()
    assert box is not None
    assert box["width"] <= 390
    tab.shot("usage-390px")
    page.emulate_media(color_scheme="dark")
    assert_readable(
        page, "#usage-section dt, #usage-section dd, #usage-section td, .chart-box text"
    )
    assert_readable(page, "#fallback-section label, #fallback-current")
    tab.shot("usage-390px-dark")
    usage.screenshot(path=str(ARTIFACTS / "admin-usage-section-390px-dark.png"))
    page.set_viewport_size({"width": 1100, "height": 900})
    tab.shot("usage-dark")
    page.emulate_media(color_scheme="light")
    assert tab.errors == []


def test_a_member_reads_usage_and_the_fallback_policy_without_changing_it(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    stack.app.workspace_settings.set_fallback_policy("acme", "on_error", actor_id="alice")
    tab = open_page(browser, tabs, base_url, MEMBER_TOKEN, "member-usage")
    page = tab.page
    expect(page.locator("#usage-share")).to_have_text("0 of 0")
    expect(page.locator("#usage-empty")).to_be_visible()
    expect(page.locator("#usage-chart svg g.bar")).to_have_count(30)
    expect(page.locator("#usage-chart svg rect")).to_have_count(0)
    expect(page.locator("#fallback-current")).to_contain_text("On any refusal")
    expect(page.locator("#fallback-form")).to_be_hidden()
    expect(page.get_by_role("radio")).to_have_count(0)
    tab.shot("usage-and-fallback")
    assert tab.errors == []


def test_the_page_says_which_key_runs_use_and_a_refused_key_is_not_green(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    service = stack.app.key_service(stack.pm)
    refused = random_key("openai")
    service.set_key(ADMIN, "acme", "openai", random_key("openai"), label="default", test=False)
    service.set_key(ADMIN, "acme", "openai", refused, label="backup", test=False)
    tab = open_page(browser, tabs, base_url, ADMIN_TOKEN, "admin-two-keys")
    page = tab.page
    openai = card(page, "openai")
    expect(openai.locator(".provider-meta")).to_contain_text(
        "Runs take turns between the 2 enabled keys"
    )
    expect(openai.locator(".in-use")).to_have_text(["In rotation", "In rotation"])

    stack.checker.refused.add(refused)
    openai.get_by_role("button", name="Test OpenAI key “backup”").click()
    backup = openai.locator("li.key", has=page.get_by_text("backup", exact=True))
    expect(backup.locator(".status-pill")).to_have_text("Refused by the provider")
    expect(backup.locator(".status-pill")).not_to_have_class(re.compile(r"\benabled\b"))
    expect(backup.locator(".key-result")).to_contain_text("The provider refused this key")
    expect(openai.get_by_role("button", name="Test OpenAI key “backup”")).to_be_focused()
    assert_readable(page, "li.key .status-pill")
    tab.shot("refused-pill")

    # a key the provider refused during a run (in cooldown) is shown paused, not green
    from datetime import UTC, datetime, timedelta

    default_id = openai.locator("li.key", has=page.get_by_text("default", exact=True))
    key_id = default_id.get_attribute("data-key-id")
    assert key_id
    stack.app.key_store.set_cooldown(key_id, datetime.now(UTC) + timedelta(minutes=5), "auth")
    page.reload()
    paused = openai.locator(f'li.key[data-key-id="{key_id}"]')
    expect(paused.locator(".status-pill")).to_have_text("Paused")
    expect(paused.locator(".key-meta")).to_contain_text("Paused after a provider refusal")
    stack.app.key_store.set_cooldown(key_id, None)
    page.reload()
    expect(paused.locator(".status-pill")).to_have_text("Enabled")
    # the refusal is remembered (from the audit log) across a reload
    expect(backup.locator(".status-pill")).to_have_text("Refused by the provider")

    # one of two enabled: the page names the key runs use
    openai.get_by_role("button", name="Disable OpenAI key “backup”").click()
    expect(openai.locator(".provider-meta")).to_contain_text("Runs use the key “default”")
    expect(openai.locator(".in-use")).to_have_text(["Used by runs"])
    notice = page.locator("#notice")
    expect(notice).to_contain_text("disabled")
    expect(notice).to_be_in_viewport()
    # the next action clears the notice
    openai.get_by_role("button", name="Test OpenAI key “default”").click()
    expect(notice).to_be_hidden()
    tab.shot("one-used")
    assert tab.errors == []


def test_page_errors_are_in_the_pages_words_not_the_command_lines(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from playwright.sync_api import expect

    api_key = random_key("openai")
    service = stack.app.key_service(stack.pm)
    service.set_key(ADMIN, "acme", "openai", api_key, label="default", test=False)
    tab = open_page(browser, tabs, base_url, ADMIN_TOKEN, "admin-words")
    page = tab.page
    openai = card(page, "openai")
    openai.get_by_role("button", name="Add OpenAI key").click()
    openai.get_by_label("API key").fill(api_key)
    openai.get_by_role("button", name="Save key").click()
    error = openai.locator(".field-error")
    expect(error).to_contain_text("already saved in this workspace under another label")
    expect(error).to_contain_text("Replace button")
    assert "--label" not in error.inner_text()

    rejected = random_key("openai")
    stack.checker.refused.add(rejected)
    openai.get_by_label("API key").fill(rejected)
    openai.get_by_role("button", name="Save key").click()
    expect(error).to_have_text(
        "The provider refused this key (incorrect API key provided). Nothing was saved."
    )
    unreachable = random_key("openai")
    stack.checker.unreachable.add(unreachable)
    openai.get_by_label("API key").fill(unreachable)
    openai.get_by_role("button", name="Save key").click()
    expect(error).to_contain_text("could not be reached")
    expect(error).to_contain_text("untick the check")
    assert "--no-test" not in error.inner_text()
    tab.shot("words")
    assert tab.errors == []


# "today" and "this month" are the app's: no day or month may begin while the page is read
@pytest.mark.parametrize("stack", [ShiftedClock()], indirect=True, ids=["shifted-clock"])
def test_an_admin_picks_the_usage_period_and_the_chart_follows(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from datetime import timedelta

    from playwright.sync_api import expect

    now = stack.app.clock()
    days_ago = [0, 3, 20, 60, 200]
    for n, ago in enumerate(days_ago):
        stack.app.ledger.record(_ledger_call(now, n, ago, own=n % 2 == 0, cost="1"))
    today = now.date()
    this_month = sum(
        1
        for ago in days_ago
        if (today - timedelta(days=ago)).month == today.month
        and (today - timedelta(days=ago)).year == today.year
    )

    tab = open_page(browser, tabs, base_url, ADMIN_TOKEN, "admin-usage-period")
    page = tab.page
    chart = page.locator("#usage-chart svg")
    expect(page.get_by_role("region", name="Usage, last 30 days")).to_be_visible()
    expect(chart.locator("g.bar")).to_have_count(30)
    expect(page.locator("#usage-share")).to_have_text("2 of 3")

    period = page.get_by_label("Period")
    period.select_option(label="Last 7 days")
    expect(page.get_by_role("region", name="Usage, last 7 days")).to_be_visible()
    expect(chart.locator("g.bar")).to_have_count(7)
    expect(page.locator("#usage-share")).to_have_text("1 of 2")

    period.select_option(label="Last 90 days")
    expect(page.get_by_role("region", name="Usage, last 90 days")).to_be_visible()
    expect(chart.locator("g.bar")).to_have_count(90)
    expect(page.locator("#usage-share")).to_have_text("2 of 4")
    tab.shot("usage-90-days")

    period.select_option(label="This month")
    expect(page.get_by_role("region", name="Usage, this month")).to_be_visible()
    expect(chart.locator("g.bar")).to_have_count(today.day)
    expect(page.locator("#usage-share")).to_contain_text(f"of {this_month}")
    expect(chart.locator("g.bar").first).to_have_attribute(
        "data-day", today.replace(day=1).isoformat()
    )

    # on a phone, 90 days still fit, and the choice is a keyboard-reachable control
    page.set_viewport_size({"width": 390, "height": 844})
    period.select_option(label="Last 90 days")
    expect(chart.locator("g.bar")).to_have_count(90)
    assert_fits_width(page)
    period.focus()
    expect(period).to_be_focused()
    page.emulate_media(color_scheme="dark")
    assert_readable(page, "#usage-section h2, .usage-period label, .usage-period select")
    tab.shot("usage-90-days-390px-dark")
    page.emulate_media(color_scheme="light")
    assert tab.errors == []


def test_an_admin_reads_older_audit_events_page_by_page(
    browser, tabs: list[Page], base_url: str, stack: Stack
) -> None:
    from datetime import UTC, datetime, timedelta

    from byok_hookspecs import AuditEvent
    from playwright.sync_api import expect

    start = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    for n in range(230):
        stack.app.audit_store.record(
            AuditEvent(
                action="key.tested",
                workspace_id="acme",
                actor_id="alice",
                detail=f"event {n}",
                occurred_at=start + timedelta(minutes=n),
            )
        )

    tab = open_page(browser, tabs, base_url, ADMIN_TOKEN, "admin-audit-pages")
    page = tab.page
    section = page.get_by_role("region", name="Audit log")
    rows = section.locator("tbody tr")
    expect(rows).to_have_count(100)
    expect(rows.first.locator(".audit-detail")).to_have_text("event 229")
    expect(section.locator("#audit-count")).to_have_text("The latest 100 events shown.")
    older = section.get_by_role("button", name="Show older events")
    assert_readable(page, "#audit-count, #audit-older")
    page.emulate_media(color_scheme="dark")
    assert_readable(page, "#audit-count, #audit-older")
    page.emulate_media(color_scheme="light")
    older.click()
    expect(rows).to_have_count(200)
    # the next page continues where the first one stopped, newest first
    expect(rows.nth(99).locator(".audit-detail")).to_have_text("event 130")
    expect(rows.nth(100).locator(".audit-detail")).to_have_text("event 129")
    expect(older).to_be_focused()
    older.press("Enter")
    expect(rows).to_have_count(230)
    expect(rows.last.locator(".audit-detail")).to_have_text("event 0")
    expect(older).to_be_hidden()
    expect(section.locator("#audit-count")).to_have_text("All 230 events shown.")
    expect(page.locator("#audit-scroll")).to_be_focused()
    tab.shot("audit-all-pages")

    # a change on the page shows the newest page again
    stack.app.key_service(stack.pm).set_key(
        ADMIN, "acme", "openai", random_key("openai"), label="default", test=False
    )
    page.reload()
    expect(rows).to_have_count(100)
    expect(rows.first.locator(".audit-what")).to_have_text("Key added")
    expect(older).to_be_visible()
    assert tab.errors == []
