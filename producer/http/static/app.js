// memfleet "your data" page. No framework and no HTML from strings: every piece of data goes
// into the page as text (textContent), so a memory that reads like markup is shown as it reads.
// The key lives in this module and in sessionStorage, and leaves only as the Authorization
// header of requests to this page's own origin.

const KEY_SLOT = "memfleet.key";
const FLEET_EVERY_MS = 5000;

const state = {
  key: null, // the pasted key
  me: null, // GET /api/whoami
  user: null, // the user whose memories are shown
  cursors: [null], // cursors[i] opens page i
  page: 0,
  next: null, // next_cursor of the page shown
  query: null, // the search shown, or null for the pages
  view: 0, // counts list loads: only the latest one may fill the list
  fleetTimer: null,
  lastEncoders: null, // {at, use} of the previous fleet refresh, for the busy share
};

const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// --- talking to /api ----------------------------------------------------------------------------

async function detailOf(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (body.detail !== undefined) return JSON.stringify(body.detail);
  } catch {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText}`.trim();
}

// A request to this origin with the key. An app key names the user: in the body if there is
// one, else in the query. A user key names no one (the server uses its own user).
async function api(method, path, { query = {}, body, scoped = true } = {}) {
  const url = new URL(path, window.location.origin);
  const forUser = scoped && state.me?.kind === "app" ? { user_id: state.user } : {};
  const inQuery = body === undefined ? { ...forUser, ...query } : query;
  for (const [name, value] of Object.entries(inQuery)) {
    if (value !== null && value !== undefined) url.searchParams.set(name, String(value));
  }
  const init = {
    method,
    headers: { Authorization: `Token ${state.key}` },
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify({ ...forUser, ...body });
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch {
    throw new ApiError(0, "the server could not be reached; is memfleet serve running?");
  }
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return response;
}

const getJson = async (path, options) => (await api("GET", path, options)).json();
const sendJson = async (method, path, body, options = {}) => (await api(method, path, { ...options, body })).json();
const memoryPath = (id) => `/api/memories/${encodeURIComponent(id)}`;

// --- messages -------------------------------------------------------------------------------------

function say(text) {
  $("error").textContent = "";
  $("status").textContent = text;
}

function fail(error) {
  $("status").textContent = "";
  if (error instanceof ApiError && error.status === 401 && state.key) {
    signOut();
    $("error").textContent = `Signed out: ${error.message}`;
    return;
  }
  $("error").textContent = error instanceof Error ? error.message : String(error);
}

// Run an action with the section marked busy; errors are shown, never thrown at the page.
async function act(section, action) {
  $("error").textContent = ""; // a new action: the last one's error no longer applies
  section.setAttribute("aria-busy", "true");
  try {
    await action();
  } catch (error) {
    fail(error);
  } finally {
    section.removeAttribute("aria-busy");
  }
}

// --- times ----------------------------------------------------------------------------------------

const formatTime = (date) => date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });

function timeElement(iso, prefix) {
  const span = document.createElement("span");
  span.append(prefix);
  const time = document.createElement("time");
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) {
    time.textContent = iso;
  } else {
    time.dateTime = date.toISOString();
    time.textContent = formatTime(date);
    time.title = date.toISOString();
  }
  span.append(time);
  return span;
}

const pad = (n) => String(n).padStart(2, "0");

// The value a datetime-local input takes for a moment, in the browser's time zone.
function localInputValue(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

// --- signing in and out ---------------------------------------------------------------------------

async function signIn(key) {
  state.key = key;
  let me;
  try {
    me = await getJson("/api/whoami", { scoped: false });
  } catch (error) {
    state.key = null;
    sessionStorage.removeItem(KEY_SLOT);
    fail(error.status === 401 ? new ApiError(401, `That key was refused: ${error.message}`) : error);
    return;
  }
  state.me = me;
  sessionStorage.setItem(KEY_SLOT, key);
  $("sign-in").hidden = true;
  $("session").hidden = false;
  $("who").textContent = me.kind === "app"
    ? `${me.name} · app key`
    : `${me.name} · user key for ${me.user_id}`;
  say(`Signed in with ${me.kind} key ${me.name}.`);
  if (me.kind === "app") {
    $("pick-user").hidden = false;
    $("fleet").hidden = false;
    $("user-id").focus();
    startFleet();
  } else {
    openUser(me.user_id);
  }
}

function signOut() {
  state.key = null;
  state.me = null;
  state.user = null;
  state.query = null;
  state.lastEncoders = null;
  state.view += 1;
  sessionStorage.removeItem(KEY_SLOT);
  clearInterval(state.fleetTimer);
  state.fleetTimer = null;
  for (const id of ["session", "pick-user", "fleet", "memories"]) $(id).hidden = true;
  $("list").replaceChildren();
  $("encoder-rows").replaceChildren();
  $("fleet-time").textContent = "";
  for (const dd of document.querySelectorAll("[data-stat]")) dd.textContent = "–";
  for (const form of document.querySelectorAll("form")) form.reset();
  $("error").textContent = "";
  $("sign-in").hidden = false;
  say("Signed out.");
  $("key").focus();
}

// --- memories -------------------------------------------------------------------------------------

async function openUser(user) {
  const section = $("memories");
  state.user = user;
  state.query = null;
  state.cursors = [null];
  state.page = 0;
  $("memories-user").textContent = user;
  $("list").replaceChildren(); // never the last user's memories under this one's name
  $("list-caption").textContent = "Loading…";
  $("query").value = "";
  $("search-clear").hidden = true;
  $("error").textContent = "";
  section.setAttribute("aria-busy", "true");
  try {
    await loadPage();
    section.hidden = false;
    $("memories-title").focus();
  } catch (error) {
    if (state.user !== user) return; // another user was opened meanwhile
    // Nothing of the user shown before may stay under a heading that names another.
    state.user = null;
    section.hidden = true;
    $("list").replaceChildren();
    fail(error);
  } finally {
    section.removeAttribute("aria-busy");
  }
}

const pageSize = () => Number($("page-size").value);

async function loadPage() {
  const view = ++state.view;
  const page = await getJson("/api/memories", { query: { limit: pageSize(), cursor: state.cursors[state.page] } });
  if (view !== state.view) return; // another user, page or search was asked for meanwhile
  if (page.memories.length === 0 && state.page > 0) {
    // The last memories of this page went (deleted here, or expired): show the page before.
    state.cursors.pop();
    state.page -= 1;
    return loadPage();
  }
  state.next = page.next_cursor;
  renderList(page.memories);
  const count = page.memories.length;
  $("list-caption").textContent = count === 0
    ? "No memories."
    : `Page ${state.page + 1}: ${count} ${count === 1 ? "memory" : "memories"}.`;
  $("page-no").textContent = `Page ${state.page + 1}`;
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.next === null;
  $("prev").parentElement.hidden = false;
}

async function runSearch() {
  const view = ++state.view;
  const answer = await sendJson("POST", "/api/memories/search", { query: state.query, limit: pageSize() });
  if (view !== state.view) return;
  renderList(answer.results);
  const count = answer.results.length;
  $("list-caption").textContent = `${count} ${count === 1 ? "result" : "results"} for “${state.query}”.`;
  $("prev").parentElement.hidden = true;
  $("search-clear").hidden = false;
}

// What is shown again after a change: the search, or the page.
const reload = () => (state.query === null ? loadPage() : runSearch());

function renderList(memories) {
  $("list").replaceChildren(...memories.map(renderMemory));
}

function renderMemory(memory) {
  const item = $("memory-item").content.firstElementChild.cloneNode(true);
  item.dataset.id = memory.id;
  item.querySelector(".text").textContent = memory.text;

  const said = item.querySelector(".said");
  if (memory.name) said.append(`${memory.name}${memory.timestamp ? ", " : ""}`);
  if (memory.timestamp) said.append(timeElement(memory.timestamp, ""));
  else if (memory.created_at) said.append(timeElement(memory.created_at, "added "));
  if (memory.updated_at && memory.updated_at !== memory.created_at) said.append(timeElement(memory.updated_at, " · edited "));

  const expiry = item.querySelector(".expiry");
  if (memory.expires_at) expiry.append(timeElement(memory.expires_at, "expires "));
  else expiry.textContent = "no expiry";
  if (memory.score !== null && memory.score !== undefined) item.querySelector(".score").textContent = `score ${memory.score.toFixed(3)}`;

  const label = memory.text.length > 40 ? `${memory.text.slice(0, 40)}…` : memory.text;
  for (const button of item.querySelectorAll(".row-actions button")) {
    button.setAttribute("aria-label", `${button.textContent}: ${label}`);
  }
  const editForm = item.querySelector(".edit-form");
  const expiryForm = item.querySelector(".expiry-form");
  const show = (form) => {
    editForm.hidden = form !== editForm;
    expiryForm.hidden = form !== expiryForm;
    item.querySelector(".row-actions").hidden = form !== null;
    if (form !== null) form.querySelector("textarea, input").focus();
  };
  for (const cancel of item.querySelectorAll("[data-act=cancel]")) {
    cancel.addEventListener("click", () => {
      show(null);
      item.querySelector("[data-act=edit]").focus();
    });
  }

  item.querySelector("[data-act=edit]").addEventListener("click", () => {
    editForm.querySelector("textarea").value = memory.text;
    show(editForm);
  });
  editForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = editForm.querySelector("textarea").value;
    act($("memories"), async () => {
      await sendJson("PATCH", memoryPath(memory.id), { text });
      await reload();
      say("Saved the new text.");
    });
  });

  item.querySelector("[data-act=expiry]").addEventListener("click", () => {
    const when = memory.expires_at ? new Date(memory.expires_at) : new Date(Date.now() + 30 * 24 * 3600 * 1000);
    expiryForm.querySelector("input").value = localInputValue(when);
    item.querySelector("[data-act=never]").hidden = !memory.expires_at;
    show(expiryForm);
  });
  expiryForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const when = new Date(expiryForm.querySelector("input").value);
    if (Number.isNaN(when.getTime())) {
      fail(new Error("that is not a date and time"));
      return;
    }
    act($("memories"), async () => {
      await sendJson("PATCH", memoryPath(memory.id), { expires_at: when.toISOString() });
      await reload();
      say(`The memory now expires ${formatTime(when)}.`);
    });
  });
  item.querySelector("[data-act=never]").addEventListener("click", () => {
    act($("memories"), async () => {
      await sendJson("PATCH", memoryPath(memory.id), { expires_at: null });
      await reload();
      say("The memory no longer expires.");
    });
  });

  item.querySelector("[data-act=delete]").addEventListener("click", async (event) => {
    const dialog = $("confirm-delete");
    const preview = dialog.querySelector(".preview");
    preview.textContent = memory.text;
    const answer = await ask(dialog, event.currentTarget);
    preview.textContent = "";
    if (answer !== "delete") return;
    act($("memories"), async () => {
      await api("DELETE", memoryPath(memory.id));
      await reload();
      say("Deleted the memory.");
    });
  });
  return item;
}

// Show a modal dialog; resolves with the value of the button that closed it ("" for Escape).
function ask(dialog, opener) {
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (opener?.isConnected) opener.focus();
      resolve(dialog.returnValue);
    }, { once: true });
  });
}

async function download() {
  const response = await api("GET", "/api/export");
  const blob = await response.blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `memfleet-${state.user}.jsonl`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  say(`Downloaded memfleet-${state.user}.jsonl (${blob.size} bytes).`);
}

async function forgetEverything(opener) {
  const dialog = $("confirm-forget");
  dialog.querySelector(".forget-user").textContent = state.user;
  $("forget-confirm").value = "";
  $("forget-go").disabled = true;
  if ((await ask(dialog, opener)) !== "forget" || $("forget-confirm").value !== state.user) return;
  await act($("memories"), async () => {
    const answer = await sendJson("POST", "/api/forget", {});
    state.query = null;
    state.cursors = [null];
    state.page = 0;
    $("query").value = "";
    $("search-clear").hidden = true;
    await loadPage();
    const deleted = answer.outcome?.deleted ?? 0;
    say(`Forgot everything of ${state.user}: ${deleted} ${deleted === 1 ? "memory" : "memories"} deleted.`);
  });
}

// --- the fleet (app keys) -------------------------------------------------------------------------

function startFleet() {
  refreshFleet();
  state.fleetTimer = setInterval(() => {
    if (document.visibilityState === "visible") refreshFleet();
  }, FLEET_EVERY_MS);
}

function setStat(name, value) {
  document.querySelector(`[data-stat="${name}"]`).textContent = String(value);
}

// Runs every few seconds, so it reports in its own panel and leaves the page's messages alone.
async function refreshFleet() {
  if (state.me?.kind !== "app") return;
  let stats;
  let encoders;
  try {
    [stats, encoders] = await Promise.all([
      getJson("/api/stats", { scoped: false }),
      getJson("/api/encoders", { scoped: false }),
    ]);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) fail(error);
    else $("fleet-time").textContent = `not updated: ${error.message}`;
    return;
  }
  if (state.me?.kind !== "app") return; // signed out meanwhile
  setStat("workers", stats.workers.length);
  setStat("queued-bulk", stats.queued.bulk ?? 0);
  setStat("queued-interactive", stats.queued.interactive ?? 0);
  setStat("oldest", stats.oldest_queued_seconds === null ? "none" : `${stats.oldest_queued_seconds.toFixed(1)} s`);
  setStat("in-progress", stats.in_progress);
  setStat("dead-letters", stats.dead_letters);
  setStat("completed", stats.completed);
  setStat("failed", stats.failed);
  renderEncoders(encoders);
  $("fleet-time").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

function renderEncoders(encoders) {
  const now = performance.now();
  const before = state.lastEncoders;
  const rows = [];
  for (const [worker, use] of Object.entries(encoders)) {
    for (const encoder of ["bulk", "query"]) {
      const counts = use[encoder];
      const previous = before?.use[worker]?.[encoder];
      const seconds = before ? (now - before.at) / 1000 : 0;
      // Bulk may run several streams at once, so its share can pass 100%.
      const busy = previous && seconds > 0 && counts.busy_seconds >= previous.busy_seconds
        ? `${Math.round((100 * (counts.busy_seconds - previous.busy_seconds)) / seconds)}%`
        : "–";
      const row = document.createElement("tr");
      const head = document.createElement("th");
      head.scope = "row";
      head.textContent = worker;
      row.append(head);
      for (const value of [encoder, counts.texts, counts.batches, counts.busy_seconds.toFixed(1), busy]) {
        const cell = document.createElement("td");
        cell.textContent = String(value);
        row.append(cell);
      }
      rows.push(row);
    }
  }
  if (rows.length === 0) {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = 6;
    cell.textContent = "No worker publishes encoder figures (none is running, or they use the hosted backend).";
    row.append(cell);
    rows.push(row);
  }
  $("encoder-rows").replaceChildren(...rows);
  state.lastEncoders = { at: now, use: encoders };
}

// --- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    signIn(key);
  });
  $("sign-out").addEventListener("click", signOut);
  $("pick-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const user = $("user-id").value.trim();
    if (user) openUser(user);
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.query = $("query").value.trim();
    if (!state.query) return;
    act($("memories"), runSearch);
  });
  $("search-clear").addEventListener("click", () => {
    state.query = null;
    $("query").value = "";
    $("search-clear").hidden = true;
    act($("memories"), loadPage);
  });
  $("page-size").addEventListener("change", () => {
    state.cursors = [null];
    state.page = 0;
    act($("memories"), reload);
  });
  $("next").addEventListener("click", () => {
    if (state.next === null) return;
    state.cursors.push(state.next);
    state.page += 1;
    act($("memories"), loadPage).then(() => $("memories-title").focus());
  });
  $("prev").addEventListener("click", () => {
    if (state.page === 0) return;
    state.cursors.pop();
    state.page -= 1;
    act($("memories"), loadPage).then(() => $("memories-title").focus());
  });
  $("export").addEventListener("click", () => act($("memories"), download));
  $("forget").addEventListener("click", (event) => forgetEverything(event.currentTarget));
  $("forget-confirm").addEventListener("input", () => {
    $("forget-go").disabled = $("forget-confirm").value !== state.user;
  });
  $("fleet-refresh").addEventListener("click", refreshFleet);
  for (const button of document.querySelectorAll("dialog [data-close]")) {
    button.addEventListener("click", () => button.closest("dialog").close(""));
  }

  const kept = sessionStorage.getItem(KEY_SLOT);
  if (kept) signIn(kept);
  else $("key").focus();
}

wire();
