// The expert review page. Every value shown comes from other people (prompts, class names, item
// names, rater ids): it is set with textContent / createElement, never parsed as HTML. The bearer
// token is typed into the sign-in form, kept in sessionStorage and sent as an Authorization
// header; it never appears in a URL (URLs reach logs, history and Referer headers).
"use strict";

const TOKEN_KEY = "clinisynth.review.token";
const params = new URLSearchParams(location.search);
const state = { items: [], current: null, verdict: null, criteria: [], ticks: {},
                shownAt: 0, submitted: 0, busy: false, skipped: new Set(), imageUrl: null,
                started: false };
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function authHeaders() {
  const t = token();
  return t ? {"Authorization": "Bearer " + t} : {};
}

async function request(path, options = {}) {
  const headers = Object.assign(authHeaders(), options.headers || {});
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, Object.assign({}, options, {
    headers, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer"}));
  if (r.status === 401) {
    showSignin(token() ? "token refused" : "");
    throw new ApiError(401, "sign in first");
  }
  return r;
}

async function api(path, options = {}) {
  const r = await request(path, options);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new ApiError(r.status, (body.error && body.error.message) || r.statusText);
  return body;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function conditionQuery() {
  const v = $("condition").value;
  if (!v) return "";
  const c = JSON.parse(v);
  return c.class_name ? "class_name=" + encodeURIComponent(c.class_name)
                      : "prompt=" + encodeURIComponent(c.prompt);
}
function conditionLabel(c) { return c.class_name || ("prompt: " + c.prompt); }
function status(msg) { $("status").textContent = msg; }

function showSignin(msg) {
  $("signin").classList.remove("hidden");
  $("review").classList.add("hidden");
  $("signout").classList.add("hidden");
  $("signin-status").textContent = msg || "";
  $("token").focus();
}
function hideSignin() {
  $("signin").classList.add("hidden");
  $("review").classList.remove("hidden");
  if (token()) $("signout").classList.remove("hidden");
}

async function loadConditions() {
  const data = await api("/api/conditions");
  const sel = $("condition");
  sel.replaceChildren();
  const wanted = params.get("class_name") ? {class_name: params.get("class_name")}
               : params.get("prompt") ? {prompt: params.get("prompt")} : null;
  const all = data.conditions.map((c) => c.condition);
  if (wanted && !all.some((c) => JSON.stringify(c) === JSON.stringify(wanted))) all.unshift(wanted);
  for (const c of all) {
    const o = el("option", conditionLabel(c));
    o.value = JSON.stringify(c);
    sel.appendChild(o);
  }
  if (wanted) sel.value = JSON.stringify(wanted);
}

async function loadChecklist() {
  const q = conditionQuery();
  if (!q) { state.criteria = []; renderCriteria(); return; }
  const data = await api("/api/checklist?" + q);
  state.criteria = data.criteria;
  renderCriteria();
}
function renderCriteria() {
  const ol = $("criteria");
  ol.replaceChildren();
  state.criteria.forEach((c, i) => {
    const li = el("li", null, state.ticks[c.name] ? "on" : "");
    li.dataset.name = c.name;
    if (i < 9) { li.appendChild(el("kbd", i + 1)); li.appendChild(document.createTextNode(" ")); }
    li.appendChild(document.createTextNode((state.ticks[c.name] ? "☑ " : "☐ ") + c.description));
    ol.appendChild(li);
  });
}
function renderVerdict() {
  const v = state.verdict;
  $("verdict").textContent = v === null ? "no verdict" : (v ? "plausible" : "implausible");
  $("image").className = v === null ? "" : (v ? "plausible" : "implausible");
}

function table(headings, rows) {
  const t = el("table");
  const head = el("tr");
  for (const h of headings) head.appendChild(el("th", h));
  t.appendChild(head);
  for (const row of rows) {
    const tr = el("tr");
    for (const [value, cls] of row) tr.appendChild(el("td", value, cls));
    t.appendChild(tr);
  }
  return t;
}
const pct = (x) => (x === null || x === undefined) ? "–" : (100 * x).toFixed(0) + "%";

async function loadAgreement() {
  const q = conditionQuery();
  const data = await api("/api/agreement" + (q ? "?" + q : ""));
  const conditions = table(
    ["condition", "statistic", "kappa", "% agree", "shared items", "raters"],
    data.conditions.map((c) => [
      [c.condition.class_name || c.condition.prompt, "condition"], [c.statistic],
      [c.kappa === null ? "–" : c.kappa.toFixed(2), "kappa"], [pct(c.percent_agreement)],
      [c.shared_items], [c.raters]]));
  const raters = table(
    ["rater", "judgements", "plausible", "agrees w/ majority", "median time"],
    data.raters.map((r) => [
      [r.rater_id, "rater"], [r.judgements], [pct(r.plausible_rate)],
      [pct(r.agreement_with_majority)],
      [r.median_time_spent_ms === null ? "–" : (r.median_time_spent_ms / 1000).toFixed(1) + " s"]]));
  $("agreement").replaceChildren(conditions, raters);
}

async function showImage(item) {
  // <img src> cannot carry an Authorization header: fetch the bytes, show them as a blob: URL.
  const r = await request(item.image_url);
  if (!r.ok) throw new ApiError(r.status, "image " + r.status);
  const blob = await r.blob();
  if (state.current !== item) return;  // the rater moved on meanwhile
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(blob);
  $("image").src = state.imageUrl;
}

async function nextItem() {
  const rater = $("rater").value.trim();
  if (!rater) { status("enter your rater id"); return; }
  if (!state.items.length) {
    const q = conditionQuery();
    const data = await api("/api/next?rater=" + encodeURIComponent(rater) + "&limit=10" +
                           (q ? "&" + q : ""));
    state.items = data.items.filter((i) => !state.skipped.has(i.id));  // skipped: not again
    $("pending").textContent = data.pending;
  }
  state.current = state.items.shift() || null;
  state.verdict = null; state.ticks = {};
  renderVerdict(); renderCriteria();
  $("comment").value = "";
  const img = $("image");
  if (!state.current) {
    img.removeAttribute("src");
    $("item-id").textContent = "";
    $("item-score").textContent = "";
    $("item-condition").textContent = "";
    img.dataset.itemId = "";
    status("queue empty for this condition");
    return;
  }
  const item = state.current;
  img.dataset.itemId = item.id;
  $("item-id").textContent = item.name || item.id;
  $("item-score").textContent = item.p_aligned === null ? "" :
    "model P(aligned) " + item.p_aligned.toFixed(2);
  $("item-condition").textContent = conditionLabel(item.condition);
  state.shownAt = performance.now();
  status("");
  try { await showImage(item); } catch (e) { status("image not loaded: " + e.message); }
}

async function submit() {
  if (!state.current || state.busy) return;
  if (state.verdict === null) { status("press y (plausible) or n (implausible) first"); return; }
  state.busy = true;
  const criteria = {};
  for (const c of state.criteria) criteria[c.name] = !!state.ticks[c.name];
  const body = {
    client_request_id: (crypto.randomUUID ? crypto.randomUUID()
                        : String(Date.now()) + Math.random()),
    rater_id: $("rater").value.trim(),
    item_id: state.current.id,
    plausible: state.verdict,
    criteria,
    comment: $("comment").value,
    time_spent_ms: Math.round(performance.now() - state.shownAt),
  };
  try {
    // Retried with the same client_request_id on network errors: the server deduplicates.
    let res = null;
    for (let attempt = 0; attempt < 3 && res === null; attempt++) {
      try { res = await api("/api/feedback", {method: "POST", body: JSON.stringify(body)}); }
      catch (e) { if (attempt === 2 || !(e instanceof TypeError)) throw e; }
    }
    state.submitted += 1;
    $("submitted-count").textContent = state.submitted;
    status("saved " + res.feedback.id);
    await nextItem();
    await loadAgreement();
  } catch (e) {
    status("not saved: " + e.message);
  } finally {
    state.busy = false;
  }
}

// With identities (JWT / service accounts) the rater is whoever signed in: the server refuses
// another name, so the field shows the principal and cannot be edited.
async function loadIdentity() {
  const me = await api("/api/whoami");
  if (me.rater) { $("rater").value = me.rater; $("rater").readOnly = true; }
  else $("rater").readOnly = false;
}

async function start() {
  try {
    await loadIdentity();
    await loadConditions();
    hideSignin();
    await loadChecklist();
    await nextItem();
    await loadAgreement();
    document.body.dataset.ready = "1";
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) status("error: " + e.message);
  }
}

function onKey(ev) {
  if (!$("signin").classList.contains("hidden")) return;  // typing a token, not judging
  if (ev.target === $("comment")) {
    if (ev.key === "Escape") $("comment").blur();
    return;
  }
  if (ev.target === $("rater")) {
    if (ev.key === "Enter") { $("rater").blur(); state.items = []; nextItem(); }
    return;
  }
  if (ev.target instanceof HTMLButtonElement) return;  // Enter / space press the button
  if (ev.key === "y") { state.verdict = true; renderVerdict(); }
  else if (ev.key === "n") { state.verdict = false; renderVerdict(); }
  else if (/^[1-9]$/.test(ev.key)) {
    const c = state.criteria[Number(ev.key) - 1];
    if (c) { state.ticks[c.name] = !state.ticks[c.name]; renderCriteria(); }
  }
  else if (ev.key === "Enter") { ev.preventDefault(); submit(); }
  else if (ev.key === "s") { if (state.current) state.skipped.add(state.current.id); nextItem(); }
  else if (ev.key === "c") { ev.preventDefault(); $("comment").focus(); }
}

document.addEventListener("DOMContentLoaded", () => {
  document.addEventListener("keydown", onKey);
  $("condition").addEventListener("change", async () => {
    state.items = []; await loadChecklist(); await nextItem(); await loadAgreement();
  });
  $("signin").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("signin-status").textContent = "signing in…";
    start();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showSignin("signed out");
  });
  $("rater").value = params.get("rater") || localStorage.getItem("clinisynth.rater") || "";
  $("rater").addEventListener("change",
    () => localStorage.setItem("clinisynth.rater", $("rater").value));
  start();
});
