// The redlb dashboard: polls the admin API once a second; no framework, no build, no CDN.
// The token (when the instance has one) is kept in this tab's sessionStorage only and sent
// as a Bearer header; the API never sets cookies.
"use strict";

const API = "/api/v1";
const POLL_MS = 1000;
let token = sessionStorage.getItem("redlb-token") || "";

function headers(json) {
  const h = {};
  if (token) h["Authorization"] = "Bearer " + token;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = {
  rate: (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1)),
  pct: (v) => (v * 100).toFixed(1) + "%",
  ms: (v) => (v === null || v === undefined ? "–" : v.toFixed(1)),
  age: (s) => {
    s = Math.max(0, Math.floor(s));
    if (s < 120) return s + "s";
    if (s < 7200) return Math.floor(s / 60) + "m";
    return Math.floor(s / 3600) + "h";
  },
};

function num(text) { return el("td", { class: "num" }, text); }

function setStatus(text, bad) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = bad ? "error" : "";
}

async function call(method, path) {
  const resp = await fetch(API + path, { method, headers: headers(method !== "GET"),
                                         body: method === "POST" ? "{}" : undefined,
                                         credentials: "omit", cache: "no-store" });
  if (resp.status === 401) {
    document.getElementById("token-form").hidden = false;
    throw new Error("a token is needed");
  }
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error || resp.statusText);
  return data;
}

function renderInstances(data) {
  const body = document.querySelector("#instances tbody");
  body.replaceChildren(...data.instances.map((i) => el("tr", { "data-instance": i.id },
    el("td", {}, i.id), el("td", {}, i.host), el("td", {}, i.version), num(i.workers),
    el("td", {}, i.listen.join(" ")), num(fmt.age(data.time - i.started)),
    num(fmt.rate(i.requests_per_second)), num(i.active_requests), num(fmt.pct(i.error_rate)),
    num(i.redis_latency_ms.toFixed(1)))));
  document.getElementById("fleet-summary").textContent =
    `${data.instances.length} instance(s), ${data.pools.length} pool(s)`;
}

function renderRoutes(data) {
  const body = document.querySelector("#routes tbody");
  const rows = data.routes.map((r) => el("tr", {}, el("td", {}, r.match), el("td", {}, r.pool),
    el("td", {}, [r.strip_prefix ? "strip-prefix" : "", r.host_header ? "host=" + r.host_header : ""]
      .filter(Boolean).join(" "))));
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colspan: 3, class: "muted" },
      "no routes: every request goes to the default pool")));
  }
  body.replaceChildren(...rows);
}

function backendRow(pool, b) {
  const drain = el("button", {
    class: b.draining ? "undrain" : "drain",
    "data-action": b.draining ? "undrain" : "drain",
    onclick: async (event) => {
      event.target.disabled = true;
      const action = b.draining ? "undrain" : "drain";
      try {
        await call("POST", `/pools/${encodeURIComponent(pool)}/backends/` +
                           `${encodeURIComponent(b.address)}/${action}`);
        await refresh();
      } catch (err) {
        setStatus(`${action} failed: ${err.message}`, true);
      }
    },
  }, b.draining ? "undrain" : "drain");
  return el("tr", { "data-backend": b.address, "data-state": b.state },
    el("td", {}, b.address),
    el("td", { class: "state state-" + b.state }, b.state +
      (b.ejected_for ? ` (${Math.ceil(b.ejected_for)}s)` : "")),
    num(b.weight), num(b.in_flight), num(fmt.rate(b.requests_per_second)),
    num(fmt.pct(b.error_rate)),
    num(fmt.ms(b.p50_ms)), num(fmt.ms(b.p99_ms)), num(b.requests_last_minute),
    el("td", {}, drain));
}

function renderPools(data) {
  const section = document.getElementById("pools");
  const blocks = [el("h2", {}, "Pools")];
  for (const pool of data.pools) {
    const healthy = pool.backends.filter((b) => b.state === "healthy").length;
    blocks.push(el("h3", {}, `${pool.name} `,
      el("span", { class: "muted" }, `${healthy}/${pool.backends.length} healthy`)));
    const rows = pool.backends.map((b) => backendRow(pool.name, b));
    for (const bad of pool.invalid) {
      rows.push(el("tr", {}, el("td", { colspan: 10, class: "muted" },
        `invalid entry ${bad.entry}: ${bad.error}`)));
    }
    blocks.push(el("table", { class: "pool", "data-pool": pool.name },
      el("thead", {}, el("tr", {}, ...["backend", "state", "weight", "in flight", "req/s",
        "5xx rate",
        "p50 ms", "p99 ms", "req last min", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...rows)));
  }
  section.replaceChildren(...blocks);
}

// One poll at a time: when the fleet read is slow (a big fleet, Redis paused), polls must
// not pile up, each one more read of the whole fleet for redlb.
let polling = null;

function refresh() {
  if (!polling) polling = poll().finally(() => { polling = null; });
  return polling;
}

async function poll() {
  try {
    const data = await call("GET", "/overview");
    renderInstances(data);
    renderRoutes(data);
    renderPools(data);
    setStatus("live · " + new Date(data.time * 1000).toLocaleTimeString(), false);
  } catch (err) {
    setStatus(err.message, true);
  }
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("redlb-token", token);
  document.getElementById("token-form").hidden = true;
  refresh();
});

// A token may also come in the URL fragment (#token=...), which never reaches a server log.
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) {
  token = fromHash;
  sessionStorage.setItem("redlb-token", token);
  history.replaceState(null, "", location.pathname);
}

refresh();
setInterval(refresh, POLL_MS);
