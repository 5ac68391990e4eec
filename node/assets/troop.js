// Troop's pages: the gateway console and the worker status page.
// No build step, no dependencies; every value from the network goes into
// the page as text (textContent), never as markup.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c ?? ""));
  return e;
}

async function getJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(body?.error?.message || `${url} answered ${r.status}`);
  return body;
}

const fmt = {
  short: (id) => (id ? `${id.slice(0, 6)}…${id.slice(-4)}` : "—"),
  ms: (v) => (v == null ? "—" : v < 10 ? `${v.toFixed(2)} ms` : `${Math.round(v)} ms`),
  num: (v, d = 1) => (v == null ? "—" : Number(v).toFixed(d)),
  credits: (v) => (v == null ? "—" : Number(v).toFixed(3)),
  time: (ms) => new Date(ms).toLocaleTimeString(),
  share: (v) => (v == null ? "—" : `${Math.round(v * 100)} %`),
};

function note(text, bad) {
  const n = $("#note");
  if (!n) return;
  n.textContent = text;
  n.className = bad ? "bad" : "";
}

// Says how fresh the account figures are (the node reads them from the
// coordinator, which may be away or rate-limiting).
function accountNote(a) {
  const at = fmt.time(a.fetched_at_ms || Date.now());
  if (a.stale) note(`account as of ${at}: ${a.problem}`, true);
  else note(`account as of ${at}`);
}

// Runs `fn` now and every `ms`; a failure shows in the note line.
function every(ms, fn) {
  const run = async () => {
    try {
      await fn();
    } catch (e) {
      note(String(e.message || e), true);
    }
  };
  run();
  return setInterval(run, ms);
}

function setText(sel, v) {
  const e = $(sel);
  if (e && e.textContent !== String(v)) e.textContent = v;
}

function fillTable(tbody, rows, emptyText, cols) {
  tbody.replaceChildren();
  if (!rows.length) {
    tbody.append(el("tr", {}, el("td", { class: "empty", colSpan: cols }, emptyText)));
    return;
  }
  for (const r of rows) tbody.append(r);
}

// A step line of (unix ms, value) points in an SVG element.
function chart(svg, points, label) {
  const NS = "http://www.w3.org/2000/svg";
  const w = 400, h = 120, pad = 4;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren();
  const mk = (tag, attrs) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    return e;
  };
  if (points.length < 1) {
    const t = mk("text", { x: w / 2, y: h / 2, "text-anchor": "middle" });
    t.textContent = "nothing yet";
    svg.append(t);
    return;
  }
  const pts = points.length === 1 ? [[points[0][0] - 1000, 0], ...points] : points;
  const t0 = pts[0][0], t1 = Math.max(pts[pts.length - 1][0], Date.now());
  const vmax = Math.max(...pts.map((p) => p[1]), 1e-9);
  const x = (t) => pad + ((t - t0) / Math.max(t1 - t0, 1)) * (w - 2 * pad);
  const y = (v) => h - pad - (v / vmax) * (h - 2 * pad - 12);
  let d = `M${x(pts[0][0])},${y(pts[0][1])}`;
  for (let i = 1; i < pts.length; i++) d += `H${x(pts[i][0])}V${y(pts[i][1])}`;
  d += `H${x(t1)}`;
  svg.append(mk("path", { class: "area", d: `${d}V${h - pad}H${x(t0)}Z` }));
  svg.append(mk("path", { class: "line", d }));
  const t = mk("text", { x: w - pad, y: 11, "text-anchor": "end" });
  t.textContent = `${label} ${fmt.credits(vmax)}`;
  svg.append(t);
}

// Cumulative sums of `pick(tx)` over time, oldest first.
function cumulative(txs, pick) {
  let sum = 0;
  return txs
    .slice()
    .sort((a, b) => a.created_at - b.created_at || a.id - b.id)
    .map((tx) => [tx.created_at, pick(tx)])
    .filter(([, v]) => v > 0)
    .map(([t, v]) => [t, (sum += v)]);
}

function txRows(txs, me) {
  return txs.slice(0, 12).map((tx) =>
    el(
      "tr",
      {},
      el("td", {}, fmt.time(tx.created_at)),
      el("td", {}, tx.kind),
      el(
        "td",
        { class: "num", title: tx.released != null ? `${fmt.credits(tx.released)} of this reservation came back when it settled` : "" },
        tx.released != null ? `${fmt.credits(tx.amount)} (+${fmt.credits(tx.released)} back)` : fmt.credits(tx.amount),
      ),
      el("td", {}, el("span", { class: `pill ${tx.status === "posted" ? "ok" : tx.status === "pending" ? "warn" : ""}` }, tx.status)),
      el("td", { class: "mono", title: tx.debit_account === me ? tx.credit_account : tx.debit_account },
        fmt.short(tx.debit_account === me ? tx.credit_account : tx.debit_account)),
      el("td", { class: "mono", title: tx.job_id || "" }, fmt.short(tx.job_id)),
    ),
  );
}

// ---------------------------------------------------------------- console

function consolePage() {
  const history = [];
  let me = null;
  let costs = new Map(); // job id -> settled credit-seconds
  let busy = false;

  const refreshModels = async () => {
    const m = await getJson("/v1/models");
    const sel = $("#model");
    const names = m.data.map((x) => x.id);
    const have = [...sel.options].map((o) => o.value);
    if (names.join("\n") !== have.join("\n")) {
      const keep = sel.value;
      sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
      if (names.includes(keep)) sel.value = keep;
    }
    $("#send").disabled = busy || names.length === 0;
    setText("#models-note", names.length ? "" : "no model on the mesh yet");
  };

  const refreshStatus = async () => {
    const s = await getJson("/troop/status");
    me = s.account;
    setText("#peer", fmt.short(s.peer_id));
    $("#peer").title = s.peer_id;
    setText("#nat", s.nat);
    setText("#peers", s.connected_peers);
    setText("#coordinator", s.coordinator);
    const rows = s.workers.map((w) =>
      el(
        "tr",
        { "data-peer": w.peer_id },
        el("td", { class: "mono", title: w.peer_id }, fmt.short(w.peer_id)),
        el("td", {}, ...w.models.flatMap((m, i) => {
          const d = (w.digests || {})[m];
          const item = d ? el("span", { title: d }, `${m} `, el("span", { class: "mono" }, d.slice(7, 15))) : el("span", {}, m);
          return i ? [", ", item] : [item];
        })),
        el("td", {}, el("span", { class: `pill ${w.connection === "direct" ? "ok" : w.connection === "relayed" ? "warn" : ""}` }, w.connection)),
        el("td", { class: "num rtt" }, fmt.ms(w.rtt_ms)),
        el("td", { class: "num" }, w.hardware_multiplier == null ? "—" : `${fmt.num(w.hardware_multiplier, 2)}×`),
        el("td", { class: "num" }, fmt.ms(w.ttft_ms)),
        el("td", { class: "num" }, w.active_jobs == null ? "—" : `${w.active_jobs}/${w.max_jobs}`),
        el("td", { class: "num" }, w.reputation ? `${w.reputation.requests} · ${fmt.share(w.reputation.disputed_share)} disputed` : "—"),
      ),
    );
    fillTable($("#workers tbody"), rows, "no worker seen yet", 8);
    // A session's cost is one bill: shown on its first answer listed only.
    const firstOf = new Map();
    for (const a of s.answers) {
      if (!firstOf.has(a.job_id) || a.index < firstOf.get(a.job_id)) firstOf.set(a.job_id, a.index);
    }
    const costCell = (a) => {
      if (!costs.has(a.job_id)) return "pending";
      return firstOf.get(a.job_id) === a.index ? fmt.credits(costs.get(a.job_id)) : `in #${firstOf.get(a.job_id)}`;
    };
    const answers = s.answers.map((a) =>
      el(
        "tr",
        {},
        el("td", {}, fmt.time(a.at_ms)),
        el("td", {}, a.model),
        el("td", { class: "mono", title: a.worker }, fmt.short(a.worker)),
        el("td", { class: "num" }, fmt.ms(a.ttft_ms)),
        el("td", { class: "num" }, fmt.num(a.tokens_per_s)),
        el("td", { class: "num" }, a.completion_tokens ?? a.events),
        el("td", { class: "mono", title: a.job_id }, `${fmt.short(a.job_id)} #${a.index}`),
        el("td", { class: "num" }, costCell(a)),
      ),
    );
    fillTable($("#answers tbody"), answers, "no answer yet", 8);
  };

  const refreshAccount = async () => {
    const a = await getJson("/troop/account");
    me = a.account;
    setText("#available", fmt.credits(a.balance.available));
    setText("#pending", fmt.credits(a.balance.pending));
    setText("#spent", fmt.credits(a.balance.debited));
    const txs = a.transactions;
    costs = new Map(
      txs.filter((t) => t.kind === "settle" && t.job_id).map((t) => [t.job_id, Math.abs(t.amount)]),
    );
    chart($("#spending"), cumulative(txs, (t) => (t.kind === "settle" && t.debit_account === me ? Math.abs(t.amount) : 0)), "spent");
    fillTable($("#transactions tbody"), txRows(txs, me), "no transaction yet", 6);
    accountNote(a);
  };

  const addMsg = (role, text) => {
    const m = el("div", { class: `msg ${role}` }, text);
    $("#transcript").append(m);
    return m;
  };

  const ask = async (ev) => {
    ev.preventDefault();
    const text = $("#prompt").value.trim();
    const model = $("#model").value;
    if (!text || !model || busy) return;
    busy = true;
    $("#send").disabled = true;
    $("#prompt").value = "";
    history.push({ role: "user", content: text });
    addMsg("user", text);
    const bubble = addMsg("assistant", "");
    const stats = el("div", { class: "msg-stats" }, "waiting for the first token…");
    $("#transcript").append(stats);
    const t0 = performance.now();
    let first = null, pieces = 0, usage = null, answer = "";
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model, messages: history, stream: true, stream_options: { include_usage: true } }),
      });
      const worker = resp.headers.get("x-troop-worker");
      if (!resp.ok) {
        const e = await resp.json().catch(() => null);
        throw new Error(e?.error?.message || `the gateway answered ${resp.status}`);
      }
      const reader = resp.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, i);
          buf = buf.slice(i + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (!data || data === "[DONE]") continue;
            let v;
            try { v = JSON.parse(data); } catch { continue; }
            if (v.error) throw new Error(v.error.message || "the worker failed");
            const piece = v.choices?.[0]?.delta?.content;
            if (piece) {
              if (first === null) first = performance.now();
              pieces++;
              answer += piece;
              bubble.textContent = answer;
              $("#transcript").scrollTop = $("#transcript").scrollHeight;
            }
            if (v.usage) usage = v.usage;
          }
        }
      }
      history.push({ role: "assistant", content: answer });
      const end = performance.now();
      const tokens = usage?.completion_tokens ?? pieces;
      const rate = first !== null && end > first && tokens > 1 ? (tokens / ((end - first) / 1000)) : null;
      stats.textContent = `TTFT ${fmt.ms(first === null ? null : first - t0)} · ${fmt.num(rate)} tokens/s · ${tokens} tokens · worker ${fmt.short(worker)}`;
      stats.title = worker || "";
      stats.setAttribute("data-worker", worker || "");
      stats.setAttribute("data-ttft-ms", first === null ? "" : String(first - t0));
    } catch (e) {
      bubble.textContent = answer ? `${answer}\n[${e.message}]` : `Error: ${e.message}`;
      bubble.classList.add("error");
      stats.textContent = "";
      history.pop();
    } finally {
      busy = false;
      $("#send").disabled = false;
      refreshAccount().catch(() => {});
      refreshStatus().catch(() => {});
    }
  };

  $("#ask").addEventListener("submit", ask);
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) ask(e);
  });
  every(3000, refreshModels);
  every(2000, refreshStatus);
  every(4000, refreshAccount);
}

// ------------------------------------------------------------ worker page

function workerPage() {
  let me = null;
  const refreshStatus = async () => {
    const s = await getJson("/troop/status");
    me = s.peer_id;
    setText("#peer", fmt.short(s.peer_id));
    $("#peer").title = s.peer_id;
    setText("#version", s.version);
    setText("#uptime", `${Math.floor(s.uptime_s / 60)} min`);
    setText("#coordinator", s.coordinator);
    const up = s.upstream;
    const h = $("#upstream-health");
    h.textContent = up.healthy === false ? "unreachable" : "healthy";
    h.className = `pill ${up.healthy === false ? "bad" : "ok"}`;
    h.title = up.error || "";
    setText("#upstream-url", up.url);
    setText("#upstream-dialect", up.dialect);
    setText("#upstream-models", up.models.map((m) => m.name).join(", ") || "none");
    setText("#jobs-running", `${s.jobs.running} / ${s.jobs.max}`);
    setText("#jobs-served", s.jobs.served);
    setText("#jobs-failed", s.jobs.failed);
    setText("#tokens", s.jobs.tokens);
    setText("#ttft", fmt.ms(s.jobs.ttft_ms));
    setText("#rate", fmt.num(s.jobs.tokens_per_s));
    setText("#sessions", s.jobs.sessions_open);
    setText("#receipts-waiting", s.receipts.waiting);
    setText("#receipts-delivered", s.receipts.delivered);
    setText("#receipts-rejected", s.receipts.rejected);
    const nat = $("#nat");
    nat.textContent = s.nat.status;
    nat.className = `pill ${s.nat.status === "public" ? "ok" : s.nat.status === "private" ? "warn" : ""}`;
    setText("#relays", s.nat.relays.join(", ") || "none");
    setText("#listen", s.nat.listen_addrs.join(" "));
    setText("#punched", s.nat.hole_punched);
    setText("#peers", s.nat.connected_peers);
    const p = s.hardware.proof;
    const ps = $("#proof");
    ps.textContent = p.state;
    ps.className = `pill ${p.state === "verified" ? "ok" : p.state === "failed" ? "bad" : ""}`;
    ps.title = p.error || "";
    setText("#gflops", p.gflops == null ? "—" : `${fmt.num(p.gflops)} GFLOP/s`);
    setText("#multiplier", `${fmt.num(s.hardware.multiplier, 2)}×`);
  };
  const refreshAccount = async () => {
    const a = await getJson("/troop/account");
    me = a.account;
    setText("#earned", fmt.credits(a.balance.credited));
    setText("#available", fmt.credits(a.balance.available));
    const txs = a.transactions;
    chart($("#earnings"), cumulative(txs, (t) => (t.kind === "settle" && t.credit_account === me ? Math.abs(t.amount) : 0)), "earned");
    fillTable($("#transactions tbody"), txRows(txs, me), "no earnings yet", 6);
    accountNote(a);
  };
  every(2000, refreshStatus);
  every(5000, refreshAccount);
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "console") consolePage();
  else if (document.body.dataset.page === "worker") workerPage();
});
