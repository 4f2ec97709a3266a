// BYOK settings page: a small script, no build step, no dependencies.
// Every value from the server is written with textContent, never as HTML.
//
// Under byok serve the page signs in with the one-time token of the link's fragment and keeps
// the session token it gets in sessionStorage (this origin -- scheme, host and port -- and this
// tab only), sending it as "Authorization: Bearer". Never a cookie: a cookie for 127.0.0.1 would
// go to every server on that address, whatever its port. Under a host, the host's own
// authentication (its cookies, say) applies and nothing is stored here.
"use strict";

(function () {
  const apiRoot = new URL("../api/", window.location.href);
  const params = new URLSearchParams(window.location.search);
  const workspaceId = params.get("workspace");
  const $ = (sel, root = document) => root.querySelector(sel);

  // refused: ids of keys the provider refused at their last test on this page
  const state = {
    me: null, catalog: [], keys: [], canManage: false, inherited: null, refused: new Set(),
  };
  const SESSION_KEY = "byok.session";
  const session = {
    get() {
      try { return window.sessionStorage.getItem(SESSION_KEY); } catch (err) { return null; }
    },
    set(token) {
      try { window.sessionStorage.setItem(SESSION_KEY, token); } catch (err) { /* no storage */ }
    },
    clear() {
      try { window.sessionStorage.removeItem(SESSION_KEY); } catch (err) { /* no storage */ }
    },
  };
  let sessionEnded = false;
  let uid = 0;
  const nextId = (prefix) => `${prefix}-${++uid}`;

  class ApiError extends Error {
    constructor(status, code, message, field) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field || null;
    }
  }

  async function api(method, path, body) {
    const init = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
    const token = session.get();
    if (token) init.headers.Authorization = `Bearer ${token}`;
    if (method !== "GET") {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body === undefined ? {} : body);
    }
    let response;
    try {
      response = await fetch(new URL(path, apiRoot), init);
    } catch (err) {
      throw new ApiError(0, "network", "The server did not answer. Check that it is running, then try again.");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const e = (data && data.error) || {};
      if (response.status === 401 && path !== "byok/session" && token && session.get() === token) {
        // the session has ended (12 hours unused, signed out elsewhere, byok serve restarted)
        session.clear();
        sessionEnded = true;
        $("#sign-out").hidden = true;
      }
      throw new ApiError(response.status, e.code || "http_" + response.status,
        e.message || `The server answered ${response.status}.`, e.field);
    }
    return data;
  }

  const wsPath = () => `workspaces/${encodeURIComponent(workspaceId)}/byok-keys`;

  // ---- messages ---------------------------------------------------------------------------

  let noticeTimer = 0;
  const NOTICE_SECONDS = 10;

  function clearNotice() {
    window.clearTimeout(noticeTimer);
    const el = $("#notice");
    el.textContent = "";
    el.hidden = true;
  }

  // a notice shows at the bottom of the window, wherever the page is scrolled, and clears
  // itself after a few seconds or at the next action
  function notify(text) {
    clearNotice();
    const el = $("#notice");
    el.textContent = text;
    el.hidden = false;
    noticeTimer = window.setTimeout(clearNotice, NOTICE_SECONDS * 1000);
  }

  function pageError(text) {
    const el = $("#page-error");
    el.textContent = text;
    el.hidden = !text;
  }

  // the server's messages are written for the byok command line ("--label", "byok init"):
  // the page says the same in its own words
  const PAGE_WORDS = {
    duplicate_key: "This key is already saved in this workspace under another label. " +
      "To change that one, use its Replace button.",
    key_limit_reached: "This provider already has as many keys as a workspace may keep. " +
      "Delete one, or replace one with its Replace button.",
    keyring_unavailable: "The server cannot encrypt or decrypt keys: its master key is not " +
      "set up. Ask whoever runs the server.",
    key_undecryptable: "The server can no longer decrypt this key. Replace it with its Replace " +
      "button.",
    store_unavailable: "The server cannot reach its database. Try again in a moment.",
    internal_error: "Something went wrong on the server. Try again; if it keeps failing, ask " +
      "whoever runs the server to look at its log.",
  };

  function describe(err) {
    if (err.code === "key_rejected") {
      // "...: the live check said invalid (message); store it without ... --no-test ..."
      const said = /the live check said (\w+)(?: \((.*?)(?:; store it without.*)?\))?$/.exec(err.message);
      const status = said ? said[1] : "";
      const why = said && said[2] ? ` (${said[2]})` : "";
      if (status === "unreachable") {
        return `The provider could not be reached to check this key${why}. Nothing was saved. ` +
          "Try again, or untick the check to save it without one.";
      }
      return `The provider refused this key${why}. Nothing was saved.`;
    }
    if (err.code === "unauthenticated" && sessionEnded) {
      return "Your session has ended (after 12 hours unused, or byok serve was restarted). " +
        "Restart byok serve for a new sign-in link.";
    }
    if (err.code === "unauthenticated") {
      return "You are not signed in. Sign in, then reload this page. " +
        "(With byok serve, open the link it printed: each link works once.)";
    }
    if (err.code === "forbidden") {
      return "You do not have access to this. Only this workspace’s admins can do it.";
    }
    return PAGE_WORDS[err.code] || err.message;
  }

  // ---- formatting -------------------------------------------------------------------------

  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  const absolute = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

  function ago(iso) {
    const then = new Date(iso);
    const seconds = Math.round((then.getTime() - Date.now()) / 1000);
    const steps = [["year", 31536000], ["month", 2592000], ["week", 604800], ["day", 86400],
      ["hour", 3600], ["minute", 60]];
    for (const [unit, size] of steps) {
      if (Math.abs(seconds) >= size) return relative.format(Math.round(seconds / size), unit);
    }
    return "just now";
  }

  function timeEl(prefix, iso) {
    const span = document.createElement("span");
    span.append(prefix);
    const t = document.createElement("time");
    t.dateTime = iso;
    t.title = absolute.format(new Date(iso));
    t.textContent = ago(iso);
    span.append(t);
    return span;
  }

  // ---- rendering --------------------------------------------------------------------------

  function providerList() {
    const known = new Map(state.catalog.map((p) => [p.id, p]));
    for (const key of state.keys) {
      if (!known.has(key.provider)) known.set(key.provider, { id: key.provider, name: key.provider, models: [] });
    }
    return [...known.values()];
  }

  function render(focusSelector) {
    const host = $("#providers");
    host.replaceChildren();
    for (const provider of providerList()) host.append(renderProvider(provider));
    host.setAttribute("aria-busy", "false");
    $("#readonly-note").hidden = state.canManage;
    if (!state.canManage) {
      for (const el of host.querySelectorAll("[data-admin]")) el.remove();
    }
    if (focusSelector) {
      const target = host.querySelector(focusSelector);
      if (target) target.focus();
    }
  }

  function renderProvider(provider) {
    const node = $("#provider-template").content.firstElementChild.cloneNode(true);
    node.dataset.provider = provider.id;
    const headingId = nextId("provider");
    const heading = $(".provider-name", node);
    heading.id = headingId;
    heading.textContent = provider.name;
    node.setAttribute("aria-labelledby", headingId);
    const count = (n, word) => `${n} hosted ${word}${n === 1 ? "" : "s"}`;
    const chats = provider.models.filter((m) => m.hosted && m.kind !== "tool").length;
    const tools = provider.models.filter((m) => m.hosted && m.kind === "tool").length;
    const hosted = chats + tools;
    const keys = state.keys.filter((k) => k.provider === provider.id)
      .sort((a, b) => a.label.localeCompare(b.label));
    const usable = keys.filter((k) => k.status === "enabled");
    const enabled = usable.length;
    for (const key of keys) key.in_use = "";
    if (enabled === 1 && keys.length > 1) usable[0].in_use = "Used by runs";
    if (enabled > 1) for (const key of usable) key.in_use = "In rotation";
    const inherited = state.inherited
      ? state.inherited.keys.filter((k) => k.provider === provider.id) : [];
    const pooled = inherited.filter((k) => k.active && k.status === "enabled").length;
    const org = state.inherited ? state.inherited.organization_id : null;
    const models = [chats && count(chats, "model"), tools && count(tools, "tool")]
      .filter(Boolean).join(" and ");
    $(".provider-meta", node).textContent = enabled > 1
      ? `Runs take turns between the ${enabled} enabled keys (a block can name one by its ` +
        "label), skipping a key paused after a refusal; the provider bills you directly"
      : enabled === 1 && keys.length > 1
        ? `Runs use the key “${usable[0].label}” (the others are disabled); the provider bills you directly`
        : enabled
          ? "Runs use this workspace’s key; the provider bills you directly"
          : pooled
            ? `Runs use the key of organization ${org}; the provider bills it directly`
            : keys.length
              ? "Every key is disabled: runs do not use them"
              : hosted ? models : "Not hosted by the platform";
    $(".empty", node).textContent = hosted
      ? `No key yet. Runs use the platform’s key for the ${models}, billed to the workspace.`
      : "No key yet. Runs on this provider need one.";
    const list = $(".keys", node);
    for (const key of keys) list.append(renderKey(key, provider));
    for (const key of inherited) list.append(renderInherited(key, org));
    node.classList.toggle("has-keys", keys.length + inherited.length > 0);
    const add = $(".add-key", node);
    add.setAttribute("aria-label", `Add ${provider.name} key`);
    add.addEventListener("click", () => openForm(node, provider, null, add));
    return node;
  }

  function renderKey(key, provider) {
    const node = $("#key-template").content.firstElementChild.cloneNode(true);
    node.dataset.keyId = key.id;
    node.classList.toggle("disabled", key.status !== "enabled");
    $(".key-label", node).textContent = key.label;
    const pill = $(".status-pill", node);
    const paused = key.cooldown_until && new Date(key.cooldown_until) > new Date();
    if (key.status !== "enabled") {
      pill.textContent = "Disabled";
      pill.classList.add("disabled");
    } else if (state.refused.has(key.id)) {
      pill.textContent = "Refused by the provider";
      pill.classList.add("refused");
    } else if (paused) {
      pill.textContent = "Paused";
      pill.classList.add("paused");
    } else {
      pill.textContent = "Enabled";
      pill.classList.add("enabled");
    }
    if (key.in_use) {
      const using = document.createElement("span");
      using.className = "in-use";
      using.textContent = key.in_use;
      $(".key-title", node).append(using);
    }
    const hint = $(".key-hint", node);
    hint.textContent = key.hint;
    hint.setAttribute("aria-label", `Masked key ${key.hint}`);
    const meta = $(".key-meta", node);
    meta.append(key.last_used_at ? timeEl("Last used ", key.last_used_at) : "Never used");
    meta.append(" · ");
    meta.append(timeEl(key.updated_at !== key.created_at ? "Updated " : "Added ", key.updated_at));
    if (key.cooldown_until && new Date(key.cooldown_until) > new Date()) {
      meta.append(" · ");
      meta.append(timeEl("Paused after a provider refusal, until ", key.cooldown_until));
    }

    const who = `${provider.name} key “${key.label}”`;
    const toggle = $(".act-toggle", node);
    toggle.textContent = key.status === "enabled" ? "Disable" : "Enable";
    toggle.setAttribute("aria-label", `${toggle.textContent} ${who}`);
    $(".act-test", node).setAttribute("aria-label", `Test ${who}`);
    $(".act-replace", node).setAttribute("aria-label", `Replace ${who}`);
    $(".act-delete", node).setAttribute("aria-label", `Delete ${who}`);

    $(".act-test", node).addEventListener("click", (ev) => testKey(node, key, ev.currentTarget));
    toggle.addEventListener("click", (ev) => toggleKey(node, key, ev.currentTarget));
    $(".act-replace", node).addEventListener("click", (ev) =>
      openForm(node.closest(".provider"), provider, key, ev.currentTarget));
    $(".act-delete", node).addEventListener("click", (ev) => askDelete(node, key, provider, ev.currentTarget));
    return node;
  }

  function renderInherited(key, org) {
    // masked and read-only: a workspace never sees nor changes its organization's keys
    const node = document.createElement("li");
    node.className = "key inherited";
    node.dataset.keyId = key.id;
    const label = document.createElement("span");
    label.className = "key-label";
    label.textContent = key.label;
    const hint = document.createElement("code");
    hint.className = "key-hint";
    hint.textContent = key.hint;
    hint.setAttribute("aria-label", `Masked key ${key.hint}`);
    const meta = document.createElement("span");
    meta.className = "key-meta";
    meta.textContent = `Inherited from organization ${org}` +
      (key.active ? "" : " · not used: this workspace opted out") +
      (key.status === "enabled" ? "" : " · disabled");
    node.append(label, " ", hint, " ", meta);
    return node;
  }

  function showResult(node, text, ok) {
    const el = $(".key-result", node);
    el.textContent = text;
    el.classList.toggle("ok", ok);
    el.classList.toggle("bad", !ok);
    el.hidden = false;
  }

  // ---- budgets (read-only: set them with byok budget or the API) ---------------------------

  const money = (text) => {
    const value = Number(text);
    if (!Number.isFinite(value)) return `$${text}`;
    const digits = value !== 0 && Math.abs(value) < 0.01 ? 6 : 2;
    return `$${value.toFixed(digits)}`;
  };

  function renderBudgets(budgets) {
    const list = $("#budgets");
    const items = budgets.map((budget) => {
      const node = $("#budget-template").content.firstElementChild.cloneNode(true);
      node.dataset.budget = budget.name;
      $(".budget-name", node).textContent = budget.name;
      $(".budget-kind", node).textContent = budget.hard ? "Hard limit" : "Soft limit";
      const what = budget.metric === "list_cost" ? "own keys at list price" : "platform charges";
      const period = budget.period === "none" ? "in total" : `per ${budget.period}`;
      const scope = [
        budget.key_id
          ? `key ${budget.key_id}${budget.key_gone ? ", which no longer exists: applies to no call" : ""}`
          : "",
        budget.workflow_id ? `workflow ${budget.workflow_id}` : "",
      ].filter(Boolean).join(", ");
      $(".budget-meta", node).textContent =
        `${money(budget.limit)} ${period}, ${what}${scope ? ` (${scope})` : ""}`;
      $(".budget-spent", node).textContent = money(budget.spent);
      $(".budget-reserved", node).textContent = money(budget.reserved);
      $(".budget-left", node).textContent = money(budget.left);
      return node;
    });
    list.replaceChildren(...items);
    $("#budgets-empty").hidden = budgets.length > 0;
  }

  async function loadBudgets() {
    const section = $("#budgets-section");
    section.hidden = false;
    try {
      const data = await api("GET", `workspaces/${encodeURIComponent(workspaceId)}/byok-budgets`);
      $("#budgets-error").hidden = true;
      renderBudgets(data.budgets);
    } catch (err) {
      $("#budgets").replaceChildren();
      $("#budgets-empty").hidden = true;
      $("#budgets-error").textContent = describe(err);
      $("#budgets-error").hidden = false;
    }
  }

  // ---- usage: figures, a stacked bar chart in inline SVG, and tables ----------------------

  const SVG = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs, text) {
    const el = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  const shortDay = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", timeZone: "UTC" });
  const dayName = (iso) => shortDay.format(new Date(`${iso}T00:00:00Z`));

  // a step for the y axis: 1, 2 or 5 times a power of ten, so that ~4 steps cover the top
  function niceStep(top) {
    const raw = top / 4;
    const power = 10 ** Math.floor(Math.log10(raw));
    return [1, 2, 5, 10].map((m) => m * power).find((step) => step >= raw);
  }

  // drawn at the width it is shown at (so that its labels keep their size on a phone), and
  // again when that width changes
  let chartData = null;
  let chartWidth = 0;
  window.addEventListener("resize", () => {
    const box = $("#usage-chart");
    if (chartData && box.clientWidth && Math.abs(box.clientWidth - chartWidth) > 8) {
      renderChart(...chartData);
    }
  });

  function renderChart(days, currency) {
    chartData = [days, currency];
    chartWidth = $("#usage-chart").clientWidth || 720;
    const width = Math.max(300, Math.min(900, chartWidth));
    const height = width < 500 ? 200 : 240, left = 56, right = 8, top = 10, bottom = 28;
    const plotW = width - left - right, plotH = height - top - bottom;
    const totals = days.map((d) => Number(d.byok_cost) + Number(d.platform_charged));
    const most = Math.max(...totals, 0);
    const step = most > 0 ? niceStep(most) : 1;
    const ceiling = most > 0 ? Math.ceil(most / step) * step : 1;
    const y = (v) => top + plotH - (v / ceiling) * plotH;
    const spent = totals.filter((t) => t > 0).length;
    const svg = svgEl("svg", {
      viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "usage-chart-title",
    });
    svg.append(svgEl("title", { id: "usage-chart-title" },
      `Spend by day over ${days.length} days: ${spent} day${spent === 1 ? "" : "s"} with spend, ` +
      `highest ${money(String(most))} ${currency}. The table below has every day.`));
    for (let v = 0; v <= ceiling + step / 2; v += step) {
      svg.append(svgEl("line", { class: "axis", x1: left, x2: width - right, y1: y(v), y2: y(v), "stroke-opacity": v ? 0.5 : 1 }));
      svg.append(svgEl("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }, money(String(v))));
    }
    const slot = plotW / days.length;
    const barW = Math.max(2, slot * 0.7);
    days.forEach((d, i) => {
      const x = left + i * slot + (slot - barW) / 2;
      const own = Number(d.byok_cost), platform = Number(d.platform_charged);
      const group = svgEl("g", { class: "bar", "data-day": d.day });
      group.append(svgEl("title", {},
        `${dayName(d.day)}: own keys ${money(d.byok_cost)}, platform ${money(d.platform_charged)}`));
      if (own > 0) {
        group.append(svgEl("rect", { class: "bar-byok", x, width: barW, y: y(own), height: y(0) - y(own) }));
      }
      if (platform > 0) {
        group.append(svgEl("rect", {
          class: "bar-platform", x, width: barW, y: y(own + platform), height: y(own) - y(own + platform),
        }));
      }
      svg.append(group);
      const every = Math.ceil(days.length / (width < 500 ? 3 : 6));
      if ((days.length - 1 - i) % every === 0) {
        const last = i === days.length - 1;
        svg.append(svgEl("text", {
          x: last ? x + barW : x + barW / 2, y: height - 8, "text-anchor": last ? "end" : "middle",
        }, dayName(d.day)));
      }
    });
    $("#usage-chart").replaceChildren(svg);
  }

  function cells(row, values) {
    for (const [text, numeric] of values) {
      const td = document.createElement("td");
      td.textContent = text;
      if (numeric) td.className = "num";
      row.append(td);
    }
    return row;
  }

  function tableRows(target, items, columns) {
    $(target).replaceChildren(...items.map((item) => cells(document.createElement("tr"), columns(item))));
  }

  // the period the usage section shows: a query of the usage route, and the heading's words
  const USAGE_PERIODS = {
    "days=7": "last 7 days",
    "days=30": "last 30 days",
    "days=90": "last 90 days",
    "period=month": "this month",
  };
  let usageRequest = 0; // only the answer to the latest choice is shown

  async function loadUsage() {
    $("#usage-section").hidden = false;
    const period = USAGE_PERIODS[$("#usage-period").value] ? $("#usage-period").value : "days=30";
    const request = ++usageRequest;
    $("#usage-title").textContent = `Usage, ${USAGE_PERIODS[period]}`;
    $("#usage-section").setAttribute("aria-busy", "true");
    try {
      const data = await api("GET", `workspaces/${encodeURIComponent(workspaceId)}/byok-usage?${period}`);
      if (request !== usageRequest) return;
      $("#usage-error").hidden = true;
      $("#usage-figures").hidden = false;
      $("#usage-chart-figure").hidden = false;
      $("#usage-currency").textContent = data.currency;
      const t = data.totals;
      $("#usage-byok").textContent = money(t.byok_cost);
      $("#usage-platform").textContent = money(t.platform_charged);
      $("#usage-saved").textContent = money(t.byok_saved);
      $("#usage-share").textContent = `${t.byok_calls} of ${t.calls}`;
      renderChart(data.by_day, data.currency);
      const spend = (x) => [[String(x.calls), true], [money(x.byok_cost), true], [money(x.platform_charged), true]];
      tableRows("#usage-days", [...data.by_day].reverse(), (d) => [[dayName(d.day), false], ...spend(d)]);
      tableRows("#usage-models", data.by_model, (m) => [[m.provider, false], [m.model, false], ...spend(m)]);
      tableRows("#usage-blocks", data.by_block, (b) => [
        [b.workflow_id || "—", false], [b.block_id || "—", false],
        [b.key_id || "platform’s key", false], ...spend(b)]);
      $("#usage-empty").hidden = t.calls > 0;
      for (const id of ["#usage-models-table", "#usage-blocks-table"]) $(id).hidden = t.calls === 0;
    } catch (err) {
      if (request !== usageRequest) return;
      $("#usage-error").textContent = describe(err);
      $("#usage-error").hidden = false;
      $("#usage-figures").hidden = true;
      $("#usage-chart-figure").hidden = true;
    } finally {
      if (request === usageRequest) $("#usage-section").removeAttribute("aria-busy");
    }
  }
  $("#usage-period").addEventListener("change", () => loadUsage());

  // ---- fallback policy (members read, admins change) ---------------------------------------

  const POLICY_WORDS = {
    never: "Never: a call whose own key fails, fails.",
    on_rate_limit: "Only when the provider’s rate limit or quota is hit.",
    on_error: "On any refusal of the own key.",
  };

  function showFallback(data) {
    const by = data.updated_at ? ` Set by ${data.updated_by || "someone"}, ` : " The default.";
    const current = $("#fallback-current");
    current.replaceChildren(`Platform key: ${POLICY_WORDS[data.policy] || data.policy}`);
    if (data.updated_at) {
      const span = document.createElement("span");
      span.className = "fallback-by";
      span.append(by, timeEl("", data.updated_at), ".");
      current.append(span);
    } else {
      current.append(by);
    }
    const form = $("#fallback-form");
    form.hidden = !data.can_manage;
    const chosen = $(`#policy-${data.policy}`);
    if (chosen) chosen.checked = true;
  }

  async function loadFallback() {
    $("#fallback-section").hidden = false;
    const path = `workspaces/${encodeURIComponent(workspaceId)}/byok-fallback`;
    try {
      showFallback(await api("GET", path));
      $("#fallback-error").hidden = true;
    } catch (err) {
      $("#fallback-error").textContent = describe(err);
      $("#fallback-error").hidden = false;
      return;
    }
    $("#fallback-form").onsubmit = (ev) => {
      ev.preventDefault();
      const picked = $("#fallback-form input[name=policy]:checked");
      if (!picked) return;
      busy($("#fallback-save"), async () => {
        try {
          showFallback(await api("PUT", path, { policy: picked.value }));
          $("#fallback-error").hidden = true;
          notify(`Fallback saved: ${POLICY_WORDS[picked.value]}`);
          await loadAudit();
        } catch (err) {
          $("#fallback-error").textContent = describe(err);
          $("#fallback-error").hidden = false;
        }
      });
    };
  }

  // ---- audit log (admins and operators) ----------------------------------------------------

  const AUDIT_ACTIONS = {
    "key.created": "Key added",
    "key.replaced": "Key replaced",
    "key.deleted": "Key deleted",
    "key.enabled": "Key enabled",
    "key.disabled": "Key disabled",
    "key.tested": "Key tested",
    "key.rewrapped": "Key re-encrypted",
    "key.cooldown": "Key paused after a refusal",
    "access.denied": "Access refused",
    "fallback.used": "Platform key used instead",
    "budget.set": "Budget set",
    "budget.deleted": "Budget deleted",
    "budget.threshold": "Budget threshold crossed",
    "settings.fallback_policy": "Fallback policy changed",
  };
  const OUTCOMES = { denied: "Refused", error: "Failed" };

  function auditRow(event) {
    const row = document.createElement("tr");
    row.dataset.action = event.action;
    const cell = (cls) => {
      const td = document.createElement("td");
      td.className = cls;
      row.append(td);
      return td;
    };
    cell("audit-when").append(timeEl("", event.occurred_at));
    const what = cell("audit-what");
    what.textContent = AUDIT_ACTIONS[event.action] || event.action;
    if (OUTCOMES[event.outcome]) {
      const pill = document.createElement("span");
      pill.className = "status-pill disabled audit-outcome";
      pill.textContent = OUTCOMES[event.outcome];
      what.append(pill);
    }
    cell("audit-who").textContent = event.actor_id || "the system";
    const key = cell("audit-key mono");
    key.textContent = [event.provider, event.key_id].filter(Boolean).join(" · ");
    cell("audit-detail").textContent = event.detail;
    return row;
  }

  // which keys the provider refused at their last test, from the log (so that a reload, or
  // another admin's page, still shows it): a later test that passed, a replacement, or an
  // admin's enable or disable clears it
  function refusedFrom(events) {
    const refused = new Set();
    for (const event of [...events].reverse()) { // oldest first
      if (!event.key_id) continue;
      if (event.action === "key.tested" && event.detail === "live check invalid") {
        refused.add(event.key_id);
      } else if (["key.tested", "key.replaced", "key.enabled", "key.disabled", "key.deleted"]
        .includes(event.action)) {
        refused.delete(event.key_id);
      }
    }
    return refused;
  }

  const sameSet = (a, b) => a.size === b.size && [...a].every((x) => b.has(x));

  // the audit log pages: 100 events at a time, "Show older events" appends the next page
  const AUDIT_PAGE = 100;
  let auditOlder = null; // the cursor of the next, older page; null when there is none
  const auditPath = (before) => `workspaces/${encodeURIComponent(workspaceId)}/byok-audit` +
    `?limit=${AUDIT_PAGE}` + (before === null ? "" : `&before=${encodeURIComponent(before)}`);

  function showAuditMore(older, counted = true) {
    auditOlder = older;
    $("#audit-older").hidden = older === null;
    const shown = $("#audit-rows").children.length;
    $("#audit-count").textContent = !counted || shown === 0 ? ""
      : older === null ? `All ${shown} events shown.` : `The latest ${shown} events shown.`;
  }

  let auditLoading = false;
  let auditGeneration = 0; // a fresh first page makes an older page on its way stale
  $("#audit-older").addEventListener("click", async () => {
    const button = $("#audit-older");
    if (auditOlder === null || auditLoading) return;
    // not disabled while it loads: a disabled button would lose the keyboard focus
    auditLoading = true;
    button.setAttribute("aria-disabled", "true");
    const generation = auditGeneration;
    try {
      const data = await api("GET", auditPath(auditOlder));
      if (generation !== auditGeneration) return;
      $("#audit-error").hidden = true;
      $("#audit-rows").append(...data.events.map(auditRow));
      showAuditMore(data.older);
      // the button goes when the log's first event is shown: focus stays in the section
      if (data.older === null) $("#audit-scroll").focus();
    } catch (err) {
      $("#audit-error").textContent = describe(err);
      $("#audit-error").hidden = false;
    } finally {
      auditLoading = false;
      button.removeAttribute("aria-disabled");
    }
  });

  async function loadAudit(focusSelector) {
    if (!state.canManage) {
      $("#audit-section").hidden = true;
      return;
    }
    $("#audit-section").hidden = false;
    auditGeneration += 1;
    try {
      const data = await api("GET", auditPath(null));
      $("#audit-error").hidden = true;
      $("#audit-rows").replaceChildren(...data.events.map(auditRow));
      $("#audit-scroll").hidden = data.events.length === 0;
      $("#audit-empty").hidden = data.events.length > 0;
      showAuditMore(data.older);
      const refused = refusedFrom(data.events);
      if (!sameSet(refused, state.refused)) {
        state.refused = refused;
        render(focusSelector);
      }
    } catch (err) {
      $("#audit-rows").replaceChildren();
      $("#audit-scroll").hidden = true;
      $("#audit-empty").hidden = true;
      showAuditMore(null, false);
      $("#audit-error").textContent = describe(err);
      $("#audit-error").hidden = false;
    }
  }

  // ---- actions ----------------------------------------------------------------------------

  async function reload(focusSelector) {
    const data = await api("GET", wsPath());
    state.keys = data.keys;
    state.canManage = data.can_manage;
    // the keys the workspace inherits from its organization, masked (read-only here)
    state.inherited = await api(
      "GET", `workspaces/${encodeURIComponent(workspaceId)}/byok-inherited-keys`);
    render(focusSelector);
    await loadAudit(focusSelector); // a key change is in the log at once
  }

  async function busy(button, work) {
    clearNotice();
    button.disabled = true;
    try {
      return await work();
    } finally {
      button.disabled = false;
    }
  }

  async function testKey(node, key, button) {
    await busy(button, async () => {
      try {
        const check = await api("POST", `${wsPath()}/${encodeURIComponent(key.id)}/test`, {});
        const words = {
          valid: "The provider accepted this key",
          invalid: "The provider refused this key",
          unreachable: "The provider could not be reached",
          skipped: "Not checked",
        };
        const text = words[check.status] + (check.message ? ` — ${check.message}` : ".");
        if (check.status === "invalid") state.refused.add(key.id);
        if (check.status === "valid") state.refused.delete(key.id);
        render(`[data-key-id="${CSS.escape(key.id)}"] .act-test`);
        showResult($(`[data-key-id="${CSS.escape(key.id)}"]`), text, check.status === "valid");
        await loadAudit(`[data-key-id="${CSS.escape(key.id)}"] .act-test`);
      } catch (err) {
        showResult(node, describe(err), false);
      }
    });
  }

  async function toggleKey(node, key, button) {
    const status = key.status === "enabled" ? "disabled" : "enabled";
    await busy(button, async () => {
      try {
        await api("PATCH", `${wsPath()}/${encodeURIComponent(key.id)}`, { status });
        state.refused.delete(key.id); // the admin has decided about this key
        notify(`Key “${key.label}” ${status}.`);
        await reload(`[data-key-id="${CSS.escape(key.id)}"] .act-toggle`);
      } catch (err) {
        showResult(node, describe(err), false);
      }
    });
  }

  function askDelete(node, key, provider, trigger) {
    const box = $(".confirm", node);
    const textId = nextId("confirm");
    const text = $(".confirm-text", box);
    text.id = textId;
    text.textContent = `Delete the ${provider.name} key “${key.label}”? Runs in this workspace stop using it at once.`;
    box.setAttribute("aria-labelledby", textId);
    box.hidden = false;
    const yes = $(".confirm-yes", box);
    const no = $(".confirm-no", box);
    const close = () => { box.hidden = true; trigger.focus(); };
    no.onclick = close;
    box.onkeydown = (ev) => { if (ev.key === "Escape") close(); };
    yes.onclick = () => busy(yes, async () => {
      try {
        await api("DELETE", wsPath(), { provider: key.provider, key_id: key.id });
        notify(`Deleted the ${provider.name} key “${key.label}”.`);
        await reload(`[data-provider="${CSS.escape(key.provider)}"] .add-key`);
      } catch (err) {
        box.hidden = true;
        showResult(node, describe(err), false);
        trigger.focus();
      }
    });
    no.focus();
  }

  function freeLabel(providerId) {
    const used = new Set(state.keys.filter((k) => k.provider === providerId).map((k) => k.label));
    if (!used.has("default")) return "default";
    for (let n = 2; ; n++) if (!used.has(`key-${n}`)) return `key-${n}`;
  }

  function openForm(providerNode, provider, key, trigger) {
    for (const open of document.querySelectorAll(".key-form")) open.remove();
    const form = $("#form-template").content.firstElementChild.cloneNode(true);
    const replacing = key !== null;
    const article = /^[aeiou]/i.test(provider.name) ? "an" : "a";
    $(".form-title", form).textContent = replacing
      ? `Replace the ${provider.name} key “${key.label}”`
      : `Add ${article} ${provider.name} key`;
    const wire = (labelSel, inputSel, name) => {
      const id = nextId(name);
      $(inputSel, form).id = id;
      $(labelSel, form).htmlFor = id;
      return $(inputSel, form);
    };
    const labelIn = wire(".lbl-label", ".in-label", "label");
    const keyIn = wire(".lbl-key", ".in-key", "key");
    const testIn = wire(".lbl-test", ".in-test", "test");
    const keyHint = $(".hint-key", form);
    keyHint.id = nextId("key-hint");
    const keyError = $(".field-error", form);
    keyError.id = nextId("key-error");
    keyIn.setAttribute("aria-describedby", keyHint.id);
    if (replacing) {
      labelIn.value = key.label;
      $(".label-field", form).hidden = true;
      $(".form-submit", form).textContent = "Replace key";
    } else {
      labelIn.value = freeLabel(provider.id);
    }
    const formError = $(".form-error", form);

    const clearErrors = () => {
      formError.hidden = true;
      keyError.hidden = true;
      for (const input of [labelIn, keyIn]) input.removeAttribute("aria-invalid");
      keyIn.setAttribute("aria-describedby", keyHint.id);
    };
    const showError = (err) => {
      const field = err.field === "api_key" ? keyIn : err.field === "label" ? labelIn : null;
      if (field === keyIn) {
        keyError.textContent = describe(err);
        keyError.hidden = false;
        keyIn.setAttribute("aria-invalid", "true");
        keyIn.setAttribute("aria-describedby", `${keyError.id} ${keyHint.id}`);
        keyIn.focus();
        return;
      }
      formError.textContent = describe(err);
      formError.hidden = false;
      if (field) {
        field.setAttribute("aria-invalid", "true");
        field.focus();
      }
    };

    const cancel = () => { form.remove(); trigger.focus(); };
    $(".form-cancel", form).addEventListener("click", cancel);
    form.addEventListener("keydown", (ev) => { if (ev.key === "Escape") cancel(); });
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      clearErrors();
      const apiKey = keyIn.value.trim();
      if (!apiKey) {
        showError({ field: "api_key", message: "Paste the API key first." });
        return;
      }
      const label = labelIn.value.trim();
      if (!label) {
        showError({ field: "label", message: "Give the key a label." });
        return;
      }
      const submit = $(".form-submit", form);
      await busy(submit, async () => {
        try {
          const result = await api("POST", wsPath(),
            { provider: provider.id, api_key: apiKey, label, test: testIn.checked });
          keyIn.value = "";
          const verb = result.created ? "Saved" : "Replaced";
          state.refused.delete(result.key.id);
          const extra = result.warnings && result.warnings.length ? ` Note: ${result.warnings.join("; ")}.` : "";
          notify(`${verb} the ${provider.name} key “${result.key.label}” (${result.key.hint}).${extra}`);
          await reload(`[data-key-id="${CSS.escape(result.key.id)}"] .act-replace`);
        } catch (err) {
          showError(err);
        }
      });
    });

    $(".form-slot", providerNode).append(form);
    keyIn.focus();
  }

  // ---- start ------------------------------------------------------------------------------

  async function login() {
    const match = /^#login=([A-Za-z0-9_-]+)$/.exec(window.location.hash);
    if (!match) return;
    history.replaceState(null, "", window.location.pathname + window.location.search);
    try {
      const signedIn = await api("POST", "byok/session", { token: match[1] });
      session.set(signedIn.session);
    } catch (err) {
      // a spent link in a tab that is still signed in: nothing to say
      if (err.code !== "not_found" && !session.get()) pageError(
        "This sign-in link has expired or was already used. Restart byok serve for a new link.");
    }
  }

  async function signOut(button) {
    button.disabled = true;
    try {
      await api("DELETE", "byok/session", {});
    } catch (err) {
      // signed out here all the same: the token is forgotten below
    }
    session.clear();
    button.hidden = true;
    $("#whoami").hidden = true;
    $("#keys-section").hidden = true;
    $("#workspace-picker").hidden = true;
    $("#providers").replaceChildren();
    pageError("");
    notify("You are signed out. To sign in again, restart byok serve for a new link.");
    $("#main").focus();
  }

  function showSignOut() {
    const button = $("#sign-out");
    if (!session.get()) return; // a host's own sign-in: its sign-out is the host's
    button.hidden = false;
    button.disabled = false;
    button.onclick = () => signOut(button);
  }

  function showWho(me) {
    const el = $("#whoami");
    el.replaceChildren(`Signed in as ${me.id}`);
    const role = me.operator ? "operator" : (me.workspaces[workspaceId] || null);
    if (workspaceId && role) {
      const badge = document.createElement("span");
      badge.className = "role-badge" + (role === "member" ? "" : " admin");
      badge.textContent = role === "operator" ? "Local operator" : role === "admin" ? "Admin" : "Member";
      el.append(badge);
    }
    el.hidden = false;
  }

  function showPicker(me) {
    const list = $("#workspace-list");
    for (const [id, role] of Object.entries(me.workspaces).sort()) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `?workspace=${encodeURIComponent(id)}`;
      a.textContent = id;
      li.append(a, ` · ${role}`);
      list.append(li);
    }
    $("#workspace-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("#workspace-input").value.trim();
      if (value) window.location.search = `?workspace=${encodeURIComponent(value)}`;
    });
    $("#workspace-picker").hidden = false;
  }

  async function start() {
    await login();
    let me;
    try {
      me = await api("GET", "byok/me");
    } catch (err) {
      if ($("#page-error").hidden) pageError(describe(err));
      return;
    }
    state.me = me;
    showWho(me);
    showSignOut();
    if (!workspaceId) {
      showPicker(me);
      return;
    }
    $("#workspace-name").textContent = workspaceId;
    $("#workspace-eyebrow").hidden = false;
    document.title = `Provider keys · ${workspaceId}`;
    $("#keys-section").hidden = false;
    try {
      const [catalog] = await Promise.all([api("GET", "byok/providers"), reload()]);
      state.catalog = catalog.providers;
      render();
      await Promise.all([loadUsage(), loadFallback(), loadBudgets()]);
    } catch (err) {
      $("#providers").replaceChildren();
      $("#providers").setAttribute("aria-busy", "false");
      pageError(describe(err));
    }
  }

  start();
})();
