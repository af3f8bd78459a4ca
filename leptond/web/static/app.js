// The leptond web UI: one script, no build step, nothing loaded from elsewhere.
// Each page is drawn from the JSON under /ui/api/ and drawn again every
// POLL_MS, so it follows the cluster without a reload. Text from the cluster
// only ever goes into the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;
const body = document.body;
const main = document.getElementById("main");
let session = null;
let timer = null;

// -- building the page ---------------------------------------------------------
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function table(headers, rows, cls) {
  return h("table", { class: cls || "grid" },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { text: x })))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

function section(title, ...children) {
  return h("section", {}, h("h2", { text: title }), ...children);
}

function badge(state) {
  return h("span", { class: "badge " + state, "data-state": state, text: state });
}

function jobLink(id) {
  return h("a", { href: "/jobs/" + encodeURIComponent(id), text: id });
}

function when(ts) {
  return ts ? new Date(ts * 1000).toLocaleString() : "-";
}

function dur(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + units[i];
}

function say(text, isError) {
  const footer = document.getElementById("status");
  footer.textContent = text || "";
  footer.className = isError ? "error" : "";
}

// -- talking to the master -----------------------------------------------------------
async function api(path, options) {
  const resp = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (resp.status === 401 && body.dataset.page !== "signin") {
    window.location.assign("/signin");
    throw new Error("signed out");
  }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = new Error((data.error && data.error.message) || ("HTTP " + resp.status));
    err.code = data.error && data.error.code;
    throw err;
  }
  return data;
}

function post(path, payload) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf },
    body: JSON.stringify(payload || {}),
  });
}

// -- the frame: navigation, who is signed in ----------------------------------------------
function frame() {
  const here = body.dataset.page;
  const links = [["overview", "/", "Overview"], ["nodes", "/nodes", "Nodes"], ["jobs", "/jobs", "Jobs"],
    ["queue", "/queue", "Queue"], ["usage", "/usage", "Usage"]];
  document.getElementById("nav").replaceChildren(...links.map(([page, href, label]) =>
    h("a", { href, class: page === here || (page === "jobs" && here === "job") ? "here" : "", text: label })));
  const out = h("form", { method: "post", action: "/signout", class: "inline" },
    h("input", { type: "hidden", name: "csrf", value: session.csrf }),
    h("button", { type: "submit", id: "signout", text: "Sign out" }));
  document.getElementById("who").replaceChildren(
    h("span", { id: "whoami", text: session.user + " (" + session.role + ")" }), out);
}

// -- pages --------------------------------------------------------------------------
function signin() {
  document.getElementById("nav").replaceChildren();
  const error = body.dataset.error;
  main.replaceChildren(section("Sign in",
    h("p", { text: "Paste a leptond access token (what leptonctl uses: ltk_...). It stays on the master; the browser keeps only a session cookie." }),
    error ? h("p", { class: "error", id: "signin-error", text: error }) : null,
    h("form", { method: "post", action: "/signin", id: "signin-form" },
      h("input", { type: "password", name: "token", id: "token", placeholder: "ltk_...", autocomplete: "off", required: true }),
      h("button", { type: "submit", id: "signin", text: "Sign in" }))));
}

function heatColor(util) {
  if (util === null || util === undefined || util < 0) return "unknown";
  return "u" + Math.min(9, Math.floor(util / 10));
}

async function overview() {
  const ov = await api("/ui/api/overview");
  // Counted by the master over every node: the list holds only the first
  // of a large cluster's nodes.
  const states = Object.assign({}, ov.node_counts || {});
  if (!ov.node_counts) for (const n of ov.nodes) states[n.state] = (states[n.state] || 0) + 1;
  const total = Object.values(states).reduce((a, b) => a + b, 0);
  const more = total - ov.nodes.length;
  const masters = table(["Master (Raft)", "RPC", "Role", "Reachable", "Lag"], ov.cluster.masters.map((m) => [
    m.raft_addr, m.rpc_addr || "-", badge(m.role), m.connected ? "yes" : "no", m.lag === undefined || m.lag === null ? "-" : String(m.lag)]));
  const heat = h("div", { class: "heatmap", id: "heatmap" }, ov.nodes.map((n) => {
    const faulty = new Set((n.gpu_faults || []).map((f) => f.index));
    const stats = {};
    for (const g of n.gpus || []) stats[g.index] = g;
    const cells = [];
    for (let i = 0; i < n.gpus_total; i++) {
      const g = stats[i];
      let cls = "cell " + (n.state === "down" ? "down" : heatColor(g ? g.util_pct : null));
      let tip = n.name + " GPU " + i + (g && g.util_pct >= 0 ? ": " + g.util_pct + "% busy" : "");
      if (faulty.has(i)) { cls = "cell faulty"; tip += " (unhealthy)"; }
      cells.push(h("span", { class: cls, title: tip, "data-gpu": i }));
    }
    return h("div", { class: "heatrow" }, h("span", { class: "label", text: n.name }), badge(n.state), cells);
  }));
  main.replaceChildren(
    h("div", { class: "cards" },
      h("div", { class: "card" }, h("b", { text: "Leader" }), h("span", { id: "leader", text: ov.cluster.leader || "none" })),
      h("div", { class: "card" }, h("b", { text: "Nodes" }),
        h("span", { id: "node-states", text: Object.entries(states).map(([k, v]) => v + " " + k).join(", ") || "none" })),
      h("div", { class: "card" }, h("b", { text: "GPUs in use" }),
        h("span", { id: "gpus", text: ov.gpus.allocated + " / " + ov.gpus.total + (ov.gpus.unhealthy ? " (" + ov.gpus.unhealthy + " unhealthy)" : "") })),
      h("div", { class: "card" }, h("b", { text: "Jobs" }),
        h("span", {}, h("a", { href: "/jobs?state=running", text: ov.counts.running + " running" }), ", ",
          h("a", { href: "/jobs?state=pending", text: ov.counts.pending + " pending" })))),
    section("GPU utilisation by node", heat,
      h("p", { class: "legend", text: "Each square is a GPU: darker is busier; red is unhealthy; grey is on a node that is down." +
        (more > 0 ? " The first " + ov.nodes.length + " of " + total + " nodes are shown." : "") })),
    section("Masters", masters));
}

async function nodes() {
  const ov = await api("/ui/api/overview");
  const onGpu = {};
  for (const j of ov.running) {
    for (const p of j.placed || []) for (const g of p.gpus) onGpu[p.node + "/" + g] = j;
  }
  const admin = session.role === "admin";
  main.replaceChildren(...ov.nodes.map((n) => {
    const faults = {};
    for (const f of n.gpu_faults || []) faults[f.index] = f.reason;
    const stats = {};
    for (const g of n.gpus || []) stats[g.index] = g;
    const rows = [];
    for (let i = 0; i < n.gpus_total; i++) {
      const g = stats[i] || {};
      const j = onGpu[n.name + "/" + i];
      rows.push([String(i), g.util_pct >= 0 ? g.util_pct + "%" : "-",
        g.mem_total_bytes ? bytes(g.mem_used_bytes) + " / " + bytes(g.mem_total_bytes) : "-",
        g.temperature_c >= 0 ? g.temperature_c + " °C" : "-",
        j ? h("span", {}, jobLink(j.id), " (" + j.user + ")") : "-",
        faults[i] !== undefined ? h("span", { class: "error", text: "unhealthy: " + faults[i] }) : "ok"]);
    }
    let drain = n.drain_reason !== null && n.drain_reason !== undefined ? "drained: " + (n.drain_reason || "no reason") : "";
    if (n.drain_deadline) drain += " (tasks stopped at " + when(n.drain_deadline) + ")";
    const actions = [];
    if (admin) {
      if (n.drain_reason === null || n.drain_reason === undefined) {
        const reason = h("input", { type: "text", placeholder: "reason", class: "reason", "data-node": n.name });
        actions.push(reason, h("button", { class: "drain", "data-node": n.name, text: "Drain",
          onclick: () => act("/ui/api/nodes/" + encodeURIComponent(n.name) + "/drain", { reason: reason.value }, n.name + " drained") }));
      } else {
        actions.push(h("button", { class: "undrain", "data-node": n.name, text: "Undrain",
          onclick: () => act("/ui/api/nodes/" + encodeURIComponent(n.name) + "/undrain", {}, n.name + " undrained") }));
      }
    }
    return h("section", { class: "node", "data-node": n.name },
      h("h2", {}, n.name, " ", badge(n.state)),
      h("p", { text: "CPUs " + n.cpus_used + " / " + n.cpus + ", memory " + bytes(n.mem_used_bytes) + " / " + bytes(n.mem_bytes) +
        (n.last_heartbeat_s !== null && n.last_heartbeat_s !== undefined ? ", heard from " + n.last_heartbeat_s + "s ago" : "") }),
      Object.keys(n.labels || {}).length ? h("p", { class: "labels", text: "Labels: " +
        Object.entries(n.labels).map(([k, v]) => k + "=" + v).join(", ") }) : null,
      drain ? h("p", { class: "drain-state", text: drain }) : null,
      table(["GPU", "Utilisation", "Memory", "Temperature", "Task", "Health"], rows),
      actions.length ? h("div", { class: "actions" }, actions) : null);
  }), ...(() => {
    // A large cluster: the master sends the first nodes and counts the rest.
    const total = Object.values(ov.node_counts || {}).reduce((a, b) => a + b, 0);
    return total > ov.nodes.length ? [h("p", { class: "legend", id: "nodes-more",
      text: "The first " + ov.nodes.length + " of " + total + " nodes are shown; leptonctl nodes lists them all." })] : [];
  })());
}

async function act(path, payload, done) {
  try {
    await post(path, payload);
    say(done, false);
  } catch (e) {
    say(e.message, true);
  }
  await refresh();
}

function jobsFilters() {
  const q = new URLSearchParams(window.location.search);
  return { state: q.get("state") || "", user: q.get("user") || "" };
}

// An array's tasks by state, as "array 0-99: 8 running, 92 pending".
const TASK_STATES = ["running", "assigned", "pending", "succeeded", "failed", "lost", "cancelled", "preempted"];
function arrayNote(j) {
  const c = j.task_states || {};
  const parts = TASK_STATES.filter((s) => c[s]).map((s) => c[s] + " " + s);
  return h("span", { class: "array-note", text: "array " + j.array + ": " + (parts.join(", ") || "no tasks") });
}

async function jobs() {
  const f = jobsFilters();
  const qs = new URLSearchParams();
  if (f.state) qs.set("state", f.state);
  if (f.user) qs.set("user", f.user);
  const list = await api("/ui/api/jobs?" + qs.toString());
  if (!document.getElementById("jobs-filter")) {
    const state = h("select", { id: "filter-state" },
      ["", "pending", "running", "succeeded", "failed", "cancelled"].map((s) =>
        h("option", { value: s, selected: s === f.state, text: s || "any state" })));
    const user = h("input", { id: "filter-user", type: "text", placeholder: "any user", value: f.user });
    const form = h("form", { id: "jobs-filter", class: "filters", onsubmit: (ev) => {
      ev.preventDefault();
      const p = new URLSearchParams();
      if (state.value) p.set("state", state.value);
      if (user.value) p.set("user", user.value);
      window.history.replaceState(null, "", "/jobs" + (p.toString() ? "?" + p.toString() : ""));
      refresh();
    } }, state, user, h("button", { type: "submit", text: "Filter" }));
    main.replaceChildren(form, h("div", { id: "jobs-table" }));
  }
  const now = Date.now() / 1000;
  document.getElementById("jobs-table").replaceChildren(
    table(["Job", "Name", "User", "State", "GPUs", "Submitted", "Ran"], list.slice().reverse().map((j) => [
      jobLink(j.id), j.name, j.user, j.array ? [badge(j.state), " ", arrayNote(j)] : badge(j.state),
      String(j.gpus_total), when(j.submitted_at),
      j.started_at ? dur((j.finished_at || now) - j.started_at) : "-"]), "grid jobs"));
}

// The output is fetched while the job is live (every LOG_POLL_MS), and once
// more after it ended; each read of someone else's output is in the audit log.
const LOG_POLL_MS = 4000;
let logRank = 0;
let logIndexOf = "";  // the array whose index logRank is
let logState = { rank: -1, at: 0, final: false, text: "", note: "", error: false };

async function job() {
  const id = body.dataset.job;
  // brief: without the spec, so polling it is not an audited read.
  const st = await api("/ui/api/jobs/" + encodeURIComponent(id) + "?brief=1");
  const live = st.state === "pending" || st.state === "running";
  // An array lists only its failed tasks; its output is read by index (the
  // rank of an array's task is its index), any index typed in.
  const isArray = Boolean(st.array);
  const ranks = st.tasks.map((t) => t.rank);
  if (isArray && logIndexOf !== id) {
    logIndexOf = id;
    logRank = ranks.length ? ranks[0] : (parseInt(st.array, 10) || 0);
  } else if (!isArray && !ranks.includes(logRank)) logRank = 0;
  let logBox = document.getElementById("log");
  const keepScroll = logBox && logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
  const head = h("section", {},
    h("h2", {}, "Job ", h("span", { id: "job-id", text: st.id }), " ", h("span", { id: "job-state" }, badge(st.state))),
    h("p", { text: st.name + " by " + st.user + ": " + (st.command || []).join(" ") }),
    st.reason ? h("p", { class: "reason", id: "job-reason", text: "Waiting: " + st.reason }) : null,
    st.message ? h("p", { class: "message", text: st.message }) : null,
    isArray ? h("p", { id: "job-array" }, arrayNote(st), " (" + st.array_tasks + " tasks)") : null,
    h("p", { text: "Submitted " + when(st.submitted_at) + "; started " + when(st.started_at) + "; ended " + when(st.finished_at) }),
    live ? h("button", { id: "cancel", text: "Cancel job", onclick: () => act("/ui/api/jobs/" + encodeURIComponent(id) + "/cancel", {}, id + " cancelled") }) : null);
  const tasks = section(isArray ? "Failed tasks" : "Tasks", table([isArray ? "Index" : "Rank", "State", "Node", "GPUs", "Attempt", "Exit", "Started", "Ended", "Message"],
    st.tasks.map((t) => [String(t.rank), badge(t.state), t.node || "-", t.gpus.join(",") || "-", String(t.attempt),
      t.exit_code === null ? "-" : String(t.exit_code), when(t.started_at), when(t.finished_at), t.reason || t.message || ""])));
  const picker = isArray
    ? h("label", {}, "index ", h("input", { id: "log-index", type: "number", min: "0", value: logRank,
      onchange: (ev) => { logRank = Number(ev.target.value); refresh(); } }))
    : h("select", { id: "log-rank", onchange: (ev) => { logRank = Number(ev.target.value); refresh(); } },
      ranks.map((r) => h("option", { value: r, selected: r === logRank, text: "rank " + r })));
  logBox = h("pre", { id: "log", class: "log" });
  const logNote = h("p", { id: "log-note", class: "note" });
  main.replaceChildren(head, tasks, section("Output (last lines)", picker, logNote, logBox));
  const now = Date.now();
  const due = logState.rank !== logRank || (!logState.final && now - logState.at >= LOG_POLL_MS);
  if (due) {
    try {
      const lg = await api("/ui/api/jobs/" + encodeURIComponent(id) + "/logs?" + (isArray ? "index=" : "rank=") + logRank);
      logState = { rank: logRank, at: now, final: !live, text: lg.text, note: lg.note || "", error: false };
    } catch (e) {
      logState = { rank: logRank, at: now, final: !live, text: "", note: e.message, error: true };
    }
  }
  logBox.textContent = logState.text;
  logNote.textContent = logState.note;
  logNote.className = logState.error ? "note error" : "note";
  if (keepScroll !== false) logBox.scrollTop = logBox.scrollHeight;
}

async function queue() {
  const rows = await api("/ui/api/queue");
  main.replaceChildren(section("Queue and fair share", table(
    ["User", "GPUs", "CPUs", "Memory", "Dominant share", "Past usage", "Pending tasks", "Pending GPUs", "GPU quota"],
    rows.map((r) => [r.user, String(r.gpus), String(r.cpus), bytes(r.mem_bytes), r.dominant_share.toFixed(3),
      (r.past_share || 0).toFixed(3), String(r.pending_tasks), String(r.pending_gpus), r.quota_gpus === null ? "-" : String(r.quota_gpus)]))));
}

async function usage() {
  const q = new URLSearchParams(window.location.search);
  const days = q.get("days") || "7";
  const res = await api("/ui/api/usage?days=" + encodeURIComponent(days));
  const picker = h("select", { id: "usage-days", onchange: (ev) => {
    window.history.replaceState(null, "", "/usage?days=" + ev.target.value); refresh();
  } }, ["1", "7", "30", "90"].map((d) => h("option", { value: d, selected: d === days, text: "last " + d + " day(s)" })));
  main.replaceChildren(section("Usage by user", picker, table(
    ["User", "GPU-hours", "CPU-hours", "Succeeded", "Failed", "Cancelled", "Running tasks"],
    res.rows.map((r) => [r.user, r.gpu_hours.toFixed(2), r.cpu_hours.toFixed(2), String(r.jobs.succeeded || 0),
      String(r.jobs.failed || 0), String(r.jobs.cancelled || 0), String(r.running_tasks)]), "grid usage")));
}

const PAGES = { overview, nodes, jobs, job, queue, usage };

async function refresh() {
  const draw = PAGES[body.dataset.page];
  if (!draw) return;
  try {
    await draw();
    body.dataset.loaded = String(Number(body.dataset.loaded || "0") + 1);
  } catch (e) {
    if (e.message !== "signed out") say(e.message, true);
  }
}

async function start() {
  if (body.dataset.page === "signin") {
    signin();
    return;
  }
  session = await api("/ui/api/session");
  frame();
  await refresh();
  timer = setInterval(refresh, POLL_MS);
}

start();
