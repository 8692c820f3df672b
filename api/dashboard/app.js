// Ladle's dashboard: one page, five views (#/ jobs, #/jobs/ID, #/compare?ids=A,B,..., #/models/ID, #/cluster),
// all read from the REST API under /api/v1 and refreshed by polling while something runs. Charts: Chart.js;
// the lineage DAG: laid out by dagre and drawn as SVG. Both are vendored builds (api/dashboard/vendor), no CDN.

const API = "/api/v1";
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const COLORS = ["#3b6fd8", "#2f9e62", "#d0453f", "#c28a1d", "#6b5bd2", "#3b9dd8", "#d8589f", "#5f6b7a"];
const KIND_COLORS = { dense: "#6b5bd2", pruned: "#c28a1d", ingredient: "#3b9dd8", soup: "#2f9e62" };

let leave = [];             // what to undo when the view changes (timers, charts)
let jobsFilter = "";        // the jobs page's status filter, kept across views
const picked = new Set();   // the jobs ticked for comparing, kept across views

// ------------------------------------------------------------------ API and auth
class Unauthorized extends Error {}
class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

const tokenKey = "ladle-token";
const token = () => localStorage.getItem(tokenKey);

async function api(path, { method = "GET" } = {}) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const r = await fetch(API + path, { method, headers });
  if (r.status === 401) {
    const first = !signedIn;
    const again = signIn("The server refused the token.");
    if (first) again.then(whoami).then(route);
    throw new Unauthorized();
  }
  if (!r.ok) {
    let detail = r.statusText;
    try { detail = (await r.json()).detail; } catch (_) { /* not JSON */ }
    throw new HttpError(r.status, `${typeof detail === "string" ? detail : JSON.stringify(detail)} (${method} ${path})`);
  }
  return r.json();
}

let signedIn = null;        // resolves once a usable token is stored
function signIn(message) {
  const dialog = document.getElementById("token-dialog");
  const error = document.getElementById("token-error");
  localStorage.removeItem(tokenKey);
  error.hidden = !message;
  error.textContent = message || "";
  if (!dialog.open) dialog.showModal();
  if (!signedIn) {
    signedIn = new Promise((resolve) => {
      document.getElementById("token-form").onsubmit = () => {
        localStorage.setItem(tokenKey, document.getElementById("token-input").value.trim());
        signedIn = null;
        resolve();
      };
    });
  }
  return signedIn;
}

async function whoami() {
  // /me never answers 401: it says whether auth is on and whether our token is good
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  const me = await (await fetch(`${API}/me`, { headers })).json();
  const el = document.getElementById("whoami");
  if (me.auth && !me.authenticated) {
    el.textContent = "";
    await signIn(token() ? "The server refused the token." : null);
    return whoami();
  }
  el.innerHTML = me.auth ? `${esc(me.name)}${me.admin ? " (admin)" : ""} · <a href="#" id="sign-out">sign out</a>` : "";
  const out = document.getElementById("sign-out");
  if (out) out.onclick = (e) => { e.preventDefault(); localStorage.removeItem(tokenKey); whoami().then(route); };
  return me;
}

// ------------------------------------------------------------------ helpers
function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const pct = (x, digits = 1) => (x == null ? "–" : `${(100 * x).toFixed(digits)}%`);
// A job's primary metric (JobPublic.metric: accuracy in %, higher is better; perplexity as it is, lower is
// better) and its values as tables, plots and axes show them
const metricOf = (job) => job?.metric ?? { name: "accuracy", mode: "max", percent: true };
const score = (m, x, digits = 2) => (x == null ? "–" : m.percent ? pct(x, digits) : Number(x).toFixed(digits));
const plotted = (m, x) => (m.percent ? 100 * x : x);
const axisTitle = (m, what) => `${what} ${m.name}${m.percent ? " (%)" : ""}`;
const metricScale = (m) => (m.percent ? { min: 0, max: 100 } : {});
// a model's test score as the lineage graph and the model panel show it
const modelScore = (n, digits = 1) => (n.perplexity != null ? `ppl ${Number(n.perplexity).toFixed(digits + 1)}` : pct(n.accuracy, digits));
// A phase metric's key in a job's phases, found by its template (`soup_{m}` -> `soup_accuracy`) in the phase
// page's columns (PhasesPublic.columns): the keys are the API's, not rebuilt here
const columnKey = (page, template) => (page.columns ?? []).find((c) => c.template === template)?.key;

// A phase metric in its column (PhasesPublic.columns: unit metric | metrics | gain | number | seconds | count)
function phaseCell(m, unit, x) {
  if (unit === "metrics") return (x ?? []).map((a) => (a == null ? "fail" : score(m, a, m.percent ? 1 : 2))).join(" ");
  if (unit === "metric") return score(m, x);
  if (unit === "gain") return x == null ? "–" : m.percent ? `${x >= 0 ? "+" : ""}${(100 * x).toFixed(2)} pp` : `${x >= 0 ? "+" : ""}${x.toFixed(2)}`;
  if (unit === "seconds") return x == null ? "–" : seconds(x);
  if (unit === "count") return x ?? "–";
  return x == null ? "–" : Number(x).toFixed(4);
}
const badge = (status) => `<span class="badge ${esc(status)}">${esc(status)}</span>`;
const bar = (p, cls = "") => `<span class="bar ${cls}"><span data-width="${(100 * (p || 0)).toFixed(1)}%"></span></span>`;

// The page's Content-Security-Policy allows no inline style, so markup carries no style attribute: an
// element names its dynamic width or colour in data-width / data-color, and this sets it through the DOM
// for every element that reaches the page (before it is painted).
const STYLED = "[data-width], [data-color]";
function applyStyle(el) {
  if (el.dataset.width) el.style.width = el.dataset.width;
  if (el.dataset.color) el.style.background = el.dataset.color;
}
new MutationObserver((records) => {
  for (const r of records) {
    for (const node of r.addedNodes) {
      if (node.nodeType !== Node.ELEMENT_NODE) continue;
      if (node.matches(STYLED)) applyStyle(node);
      node.querySelectorAll(STYLED).forEach(applyStyle);
    }
  }
}).observe(document.body, { childList: true, subtree: true });

function seconds(s) {
  if (s == null || !isFinite(s)) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}
const since = (t) => (Date.now() - new Date(t).getTime()) / 1000;
const ago = (t) => (t ? `${seconds(since(t))} ago` : "–");
const duration = (a, b) => (a ? seconds(((b ? new Date(b) : new Date()) - new Date(a)) / 1000) : "–");
const bytes = (n) => (n < 1024 ? `${n} B` : n < 2 ** 20 ? `${(n / 1024).toFixed(1)} KiB`
  : n < 2 ** 30 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 2 ** 30).toFixed(1)} GiB`);

function showError(e) {
  if (e instanceof Unauthorized) return;
  let el = document.getElementById("view-error");
  if (!el) {
    el = document.createElement("p");
    el.id = "view-error";
    el.className = "error";
    document.getElementById("view").prepend(el);
  }
  el.textContent = e.message;
}

// Call fn now and then every `ms` until the view changes, fn returns false, what it reads is gone (404) or
// is not for this token (403: the cluster page for a token that is not an admin's).
function every(ms, fn) {
  let stopped = false;
  let timer;
  const tick = async () => {
    let again = true;
    try {
      again = (await fn()) !== false;
      document.getElementById("view-error")?.remove();
    } catch (e) {
      showError(e);
      again = !(e instanceof HttpError && (e.status === 404 || e.status === 403));
    }
    if (!stopped && again) timer = setTimeout(tick, ms);
  };
  leave.push(() => { stopped = true; clearTimeout(timer); });
  return tick();
}

function chart(canvas, config) {
  const c = new Chart(canvas, config);
  leave.push(() => c.destroy());
  return c;
}

function lineOptions(x, y, xScale = { ticks: { precision: 0 } }) {
  return {
    animation: false, maintainAspectRatio: false, parsing: false,
    interaction: { mode: "nearest", intersect: false },
    plugins: { legend: { position: "bottom", labels: { boxWidth: 10, font: { size: 11 } } } },
    scales: { x: { type: "linear", title: { display: true, text: x }, ...xScale }, y: { title: { display: true, text: y } } },
  };
}

// The export formats (GET /models/{id}/download?format=): what each is, its file suffix, and which models have it
const EXPORTS = [
  { format: "dense", suffix: ".safetensors", what: "the checkpoint as stored (safetensors: state, mask, metadata)" },
  { format: "sparse", suffix: ".sparse.safetensors", what: "bitmask or CSR per pruned tensor; loads back exact" },
  { format: "hf", suffix: ".hf.zip", what: "a Hugging Face folder, zipped (from_pretrained)", llm: true },
  { format: "onnx", suffix: ".onnx", what: "ONNX for onnxruntime and friends", llm: false },
  { format: "compact", suffix: ".compact.safetensors", what: "its removed channels taken out: a smaller dense model",
    llm: false, channels: true },
];

async function download(model, format = "dense", onProgress = () => {}) {
  // a fetch (not a plain link) so that the bearer token goes along
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  const query = format === "dense" ? "" : `?format=${format}`;
  let r = await fetch(`${API}/models/${model.id}/download${query}`, { headers });
  // 202: the export is being built on the cluster; its state comes with it, ask again
  while (r.status === 202) {
    onProgress(await r.json());
    await new Promise((done) => setTimeout(done, 1000));
    r = await fetch(`${API}/models/${model.id}/download${query}`, { headers });
  }
  if (!r.ok) {
    let detail = r.statusText;
    try { const d = (await r.json()).detail; detail = typeof d === "string" ? d : d.map((e) => e.msg).join("; "); } catch (_) { /* not JSON */ }
    throw new Error(`download failed (${r.status}): ${detail}`);
  }
  const blob = await r.blob();        // rejects when the server breaks the transfer off (a damaged file)
  // the server's sha256 of the file, checked where the browser can hash (crypto.subtle: https or localhost)
  const expected = r.headers.get("X-Checksum-Sha256");
  if (expected && globalThis.crypto?.subtle) {
    const got = [...new Uint8Array(await crypto.subtle.digest("SHA-256", await blob.arrayBuffer()))]
      .map((b) => b.toString(16).padStart(2, "0")).join("");
    if (got !== expected) throw new Error(`download damaged: sha256 ${got.slice(0, 12)}… is not the server's ${expected.slice(0, 12)}…`);
  }
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  const suffix = EXPORTS.find((x) => x.format === format)?.suffix ?? "";
  a.download = `${model.name.replaceAll("/", "-")}-${model.id.slice(0, 8)}${suffix}`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

// ------------------------------------------------------------------ jobs page
async function jobsView(el) {
  el.innerHTML = `
    <div class="toolbar"><h1>Jobs</h1>
      <select id="status-filter" aria-label="status">
        <option value="">all statuses</option>${STATUSES.map((s) => `<option>${s}</option>`).join("")}
      </select><span class="muted" id="jobs-count"></span>
      <button id="compare-jobs" hidden></button></div>
    <table id="jobs"><thead><tr><th class="pick" title="tick two or more to compare them"></th><th>name</th><th>status</th>
      <th>progress</th><th class="num">phase</th><th class="num">sparsity</th><th class="num">best score</th><th class="num">age</th>
      <th class="num">duration</th></tr></thead><tbody></tbody></table>`;
  const select = el.querySelector("#status-filter");
  const tbody = el.querySelector("#jobs tbody");
  const compare = el.querySelector("#compare-jobs");
  select.value = jobsFilter;
  const showCompare = () => {
    compare.hidden = picked.size === 0;
    compare.disabled = picked.size < 2;
    compare.textContent = picked.size < 2 ? "Compare: tick another job" : `Compare ${picked.size} jobs`;
  };
  compare.onclick = () => { location.hash = `#/compare?ids=${[...picked].join(",")}`; };
  tbody.onchange = (e) => {
    const id = e.target.dataset.pick;
    if (!id) return;
    if (e.target.checked) picked.add(id); else picked.delete(id);
    showCompare();
  };
  showCompare();
  const refresh = async () => {
    const page = await api(`/jobs?limit=200${jobsFilter ? `&status=${jobsFilter}` : ""}`);
    el.querySelector("#jobs-count").textContent = `${page.count} job${page.count === 1 ? "" : "s"}`
      + (page.count > page.data.length ? ` (the newest ${page.data.length} shown)` : "");
    if (!page.data.length) {
      tbody.innerHTML = `<tr><td colspan="9" class="muted">No jobs${jobsFilter ? ` that are ${jobsFilter}` : ""}.</td></tr>`;
      return;
    }
    // each row keeps its checkbox across refreshes (a click that spans a refresh still lands)
    const rows = page.data.map((j) => {
      let tr = tbody.querySelector(`tr[data-job="${j.id}"]`);
      if (!tr) {
        tr = document.createElement("tr");
        tr.dataset.job = j.id;
        tr.innerHTML = `<td class="pick"><input type="checkbox" data-pick="${j.id}" aria-label="compare ${esc(j.name)}"></td>`;
      }
      tr.dataset.status = j.status;
      tr.querySelector("input").checked = picked.has(j.id);
      [...tr.children].slice(1).forEach((td) => td.remove());
      tr.insertAdjacentHTML("beforeend", `
        <td><a href="#/jobs/${j.id}">${esc(j.name)}</a> <span class="muted">${j.id.slice(0, 8)}</span></td>
        <td>${badge(j.status)}</td>
        <td class="progress" data-progress="${j.progress}">${bar(j.progress)} ${pct(j.progress, 0)}</td>
        <td class="num">${j.current_phase ?? "–"} / ${j.phases_total ?? "?"}</td>
        <td class="num">${pct(j.sparsity)}</td>
        <td class="num">${score(metricOf(j), j.best_score, 1)}</td>
        <td class="num">${ago(j.created_at)}</td>
        <td class="num">${duration(j.started_at, j.finished_at)}</td>`);
      return tr;
    });
    if (rows.length !== tbody.children.length || rows.some((tr, i) => tbody.children[i] !== tr)) tbody.replaceChildren(...rows);
  };
  select.onchange = () => { jobsFilter = select.value; refresh().catch(showError); };
  await every(1000, refresh);
}

// ------------------------------------------------------------------ compare page
const fixed = (x, digits = 1) => (x == null ? "–" : (+x).toFixed(digits));

// A job's wall time: the server's wall_seconds when it reports one, else finished_at (or, running, now) − started_at
function wallSeconds(job) {
  if (job.wall_seconds != null) return job.wall_seconds;
  return job.started_at ? ((job.finished_at ? new Date(job.finished_at) : new Date()) - new Date(job.started_at)) / 1000 : null;
}

// The compute a job reports (CPU-seconds, GPU-seconds, epochs trained), the parts it has
function compute(job) {
  return [[job.cpu_seconds, (x) => `${fixed(x)} CPU-s`], [job.gpu_seconds, (x) => `${fixed(x)} GPU-s`],
          [job.epochs_trained, (x) => `${fixed(x, 0)} epochs`]].filter(([x]) => x != null).map(([x, f]) => f(x));
}

async function compareView(el, idList) {
  const ids = [...new Set(idList.split(",").filter(Boolean))];
  el.innerHTML = `
    <div class="toolbar"><h1>Compare ${ids.length} jobs</h1><a href="#/">change the selection</a></div>
    <div class="card"><h2>Soup score vs sparsity</h2><div class="chart tall"><canvas id="compare-chart"></canvas></div></div>
    <div class="card"><table id="compare-table"><thead><tr><th>job</th><th>status</th><th class="num">final sparsity</th>
      <th class="num">final score</th><th class="num">best ingredient</th><th class="num">ensemble</th>
      <th class="num">wall time</th><th class="num">CPU s</th><th class="num">GPU s</th><th class="num">epochs</th>
    </tr></thead><tbody></tbody></table>
    <p class="muted">Test score (the job's metric: accuracy, or perplexity where lower is better) of the last finished
      phase: its soup (final score), its best ingredient and the ensemble of its ingredients. Phase 0 is the dense
      model, at sparsity 0.</p></div>`;
  if (ids.length < 2) throw new Error("Comparing needs two or more jobs: tick them on the jobs page.");
  const options = lineOptions("sparsity (%)", "soup test score (accuracy %, or perplexity)");
  options.plugins.tooltip = { callbacks: {
    label: (c) => `${c.raw.job}, phase ${c.raw.phase}: ${c.raw.shown} at sparsity ${c.parsed.x.toFixed(1)}%` } };
  const accChart = chart(el.querySelector("#compare-chart"), {
    type: "scatter",
    data: { datasets: ids.map((id, i) => ({ label: id.slice(0, 8), data: [], showLine: true, clip: false, borderWidth: 2, pointRadius: 4,
                                            borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length] })) },
    options,
  });
  const tbody = el.querySelector("#compare-table tbody");
  await every(2000, async () => {
    const jobs = await Promise.all(ids.map(async (id) => {
      const [job, phases] = await Promise.all([api(`/jobs/${id}`), api(`/jobs/${id}/phases`)]);
      const m = metricOf(job);
      const keys = { soup: columnKey(phases, "soup_{m}"), ingredients: columnKey(phases, "ingredient_{ms}"),
                     ensemble: columnKey(phases, "ensemble_{m}") };
      return { job, m, keys, phases: phases.data.filter((p) => p[keys.soup] != null).sort((a, b) => a.index - b.index) };
    }));
    jobs.forEach(({ job, m, keys, phases }, i) => {           // in place: a dataset hidden from the legend stays hidden
      const set = accChart.data.datasets[i];
      const wall = wallSeconds(job);
      set.label = [job.name, ...(wall == null ? [] : [`${seconds(wall)} wall`]), ...compute(job)].join(" · ");
      set.data = phases.map((p) => ({ x: 100 * (p.sparsity ?? 0), y: plotted(m, p[keys.soup]), phase: p.index,
                                      job: job.name, shown: score(m, p[keys.soup]) }));
    });
    accChart.update("none");
    tbody.innerHTML = jobs.map(({ job, m, keys, phases }, i) => {
      const last = phases.at(-1) ?? {};
      const ingredients = (last[keys.ingredients] ?? []).filter((a) => a != null);
      const best = ingredients.length ? (m.mode === "max" ? Math.max(...ingredients) : Math.min(...ingredients)) : null;
      return `<tr data-job="${job.id}">
        <td><i class="swatch" data-color="${COLORS[i % COLORS.length]}"></i><a href="#/jobs/${job.id}">${esc(job.name)}</a>
          <span class="muted">${job.id.slice(0, 8)}</span></td>
        <td>${badge(job.status)}</td>
        <td class="num">${pct(job.sparsity)}</td>
        <td class="num">${score(m, last[keys.soup])}</td>
        <td class="num">${score(m, best)}</td>
        <td class="num">${score(m, last[keys.ensemble])}</td>
        <td class="num">${seconds(wallSeconds(job))}</td>
        <td class="num">${fixed(job.cpu_seconds)}</td>
        <td class="num">${fixed(job.gpu_seconds)}</td>
        <td class="num">${fixed(job.epochs_trained, 0)}</td></tr>`;
    }).join("");
    return !jobs.every(({ job }) => job.finished);   // running ones: keep refreshing
  });
}

// ------------------------------------------------------------------ job page
async function jobView(el, jobId) {
  el.innerHTML = `
    <div class="toolbar"><h1 id="job-name">Job ${esc(jobId)}</h1><span id="job-status"></span>
      <button id="cancel" class="danger" hidden>Cancel job</button></div>
    <div class="card facts" id="job-facts"></div>
    <div class="grid">
      <div class="card"><h2 id="acc-title">Accuracy vs sparsity</h2><div class="chart"><canvas id="acc-sparsity"></canvas></div></div>
      ${robustnessCard()}
      <div class="card"><h2>Phase timeline</h2><div class="chart"><canvas id="timeline"></canvas></div></div>
    </div>
    <div class="card"><h2>Phases</h2><div id="phase-table"></div></div>
    <div class="card"><div class="toolbar"><h2>Training curves</h2>
      <select id="curve-phase" aria-label="phase"></select></div>
      <div class="curves">
        <div class="chart small"><canvas id="curve-loss"></canvas></div>
        <div class="chart small"><canvas id="curve-accuracy"></canvas></div>
        <div class="chart small"><canvas id="curve-lr"></canvas></div>
      </div></div>
    <div class="card" id="search-card" hidden><h2>Schedule search</h2><div id="search"></div></div>
    <div class="card"><h2>Lineage</h2>${legend()}
      <div class="lineage-wrap"><div class="graph"><svg id="lineage" role="img" aria-label="lineage graph"></svg></div>
      <div id="model-panel" class="card" hidden></div></div></div>
    <div class="card"><h2>Events</h2><div class="events" id="events"></div></div>`;

  const accChart = chart(el.querySelector("#acc-sparsity"), {
    type: "scatter",
    data: { datasets: [
      { label: "soup", data: [], showLine: true, borderColor: KIND_COLORS.soup, backgroundColor: KIND_COLORS.soup, pointRadius: 5 },
      { label: "ingredients", data: [], borderColor: KIND_COLORS.ingredient, backgroundColor: KIND_COLORS.ingredient, pointRadius: 3 },
      { label: "pruned, before retraining", data: [], borderColor: KIND_COLORS.pruned, backgroundColor: KIND_COLORS.pruned, pointStyle: "triangle", pointRadius: 5 },
      { label: "dense", clip: false, data: [], borderColor: KIND_COLORS.dense, backgroundColor: KIND_COLORS.dense, pointStyle: "rectRot", pointRadius: 6 },
      { label: "prediction ensemble", data: [], showLine: true, borderDash: [4, 3], borderColor: "#8a8fa0", backgroundColor: "#8a8fa0", pointStyle: "crossRot", pointRadius: 6 },
    ] },
    options: lineOptions("sparsity (%)", "test accuracy (%)", { min: 0, max: 100 }),
  });
  const drawRobustness = robustnessChart(el);
  const stages = [["dense training", "total", "#6b5bd2"], ["prune", "prune", "#c28a1d"], ["schedule search", "search", "#d8589f"],
                  ["retrain", "retrain", "#3b9dd8"],
                  ["soup + BN", "soup", "#2f9e62"], ["evaluate", "eval", "#8a8fa0"]];
  const timeline = chart(el.querySelector("#timeline"), {
    type: "bar",
    data: { labels: [], datasets: [...stages.map(([label, , color]) => ({ label, data: [], backgroundColor: color })),
                                    { label: "running", data: [], backgroundColor: "#c9d6f2" }] },
    options: { animation: false, maintainAspectRatio: false, indexAxis: "y",
               plugins: { legend: { position: "bottom", labels: { boxWidth: 10, font: { size: 11 } } },
                          tooltip: { callbacks: { label: (c) => `${c.dataset.label}: ${seconds(c.parsed.x)}` } } },
               scales: { x: { stacked: true, title: { display: true, text: "seconds" } }, y: { stacked: true } } },
  });
  const curves = {
    loss: chart(el.querySelector("#curve-loss"), { type: "line", data: { datasets: [] }, options: lineOptions("epoch", "train loss") }),
    accuracy: chart(el.querySelector("#curve-accuracy"), { type: "line", data: { datasets: [] }, options: lineOptions("epoch", "val accuracy (%)") }),
    lr: chart(el.querySelector("#curve-lr"), { type: "line", data: { datasets: [] }, options: lineOptions("epoch", "learning rate") }),
  };
  const phaseSelect = el.querySelector("#curve-phase");
  let runs = [], metrics = [], lastKey = null, lastEvent = 0, ended = false, chosenPhase = null, jobNow = null;

  phaseSelect.onchange = () => { chosenPhase = Number(phaseSelect.value); drawCurves(); };
  el.querySelector("#cancel").onclick = async (e) => {
    if (!confirm("Cancel this job? Finished models are kept.")) return;
    e.target.disabled = true;
    try { await api(`/jobs/${jobId}/cancel`, { method: "POST" }); } catch (err) { showError(err); }
    lastKey = null;
  };

  function drawCurves() {
    const phases = [...new Set(runs.map((r) => r.phase))].sort((a, b) => a - b);
    if (chosenPhase == null || !phases.includes(chosenPhase)) chosenPhase = phases.at(-1) ?? null;
    phaseSelect.innerHTML = phases.map((p) => `<option value="${p}" ${p === chosenPhase ? "selected" : ""}>phase ${p}</option>`).join("");
    const shown = runs.filter((r) => r.phase === chosenPhase);
    const series = (name, scale = 1) => shown.map((r, i) => ({
      label: r.name.split("/").pop(), borderColor: COLORS[i % COLORS.length], backgroundColor: COLORS[i % COLORS.length],
      pointRadius: 2, borderWidth: 1.5,
      data: metrics.filter((m) => m.run === r.name && m.name === name).map((m) => ({ x: m.epoch, y: m.value * scale })),
    }));
    curves.loss.data.datasets = series("train_loss");
    const m = metricOf(jobNow);
    curves.accuracy.data.datasets = series(`val_${m.name}`, m.percent ? 100 : 1);
    curves.accuracy.options.scales.y.title.text = axisTitle(m, "val");
    curves.lr.data.datasets = series("lr");
    Object.values(curves).forEach((c) => c.update("none"));
  }

  function drawPhases(job, phasePage, ingredientRuns) {
    const phases = phasePage.data, m = metricOf(job);
    const done = phases.filter((p) => p.status === "succeeded");
    const dense = done.find((p) => p.index === 0);
    const later = done.filter((p) => p.index > 0);
    const [soup, ingredients, pruned, denseSet, ensemble] = accChart.data.datasets;
    const points = (key) => later.filter((p) => p[key] != null).map((p) => ({ x: 100 * p.sparsity, y: plotted(m, p[key]) }));
    ensemble.data = points(columnKey(phasePage, "ensemble_{m}"));
    soup.data = points(columnKey(phasePage, "soup_{m}"));
    pruned.data = points(columnKey(phasePage, "pruned_{m}"));
    ingredients.data = ingredientRuns.filter((r) => r.metrics?.[`test_${m.name}`] != null).map((r) => ({
      x: 100 * (phases.find((p) => p.index === r.phase)?.sparsity ?? r.config?.sparsity ?? 0), y: plotted(m, r.metrics[`test_${m.name}`]),
    })).filter((pt) => done.some((p) => Math.abs(100 * p.sparsity - pt.x) < 1e-9));
    const d = dense?.[columnKey(phasePage, "soup_{m}")];
    denseSet.data = d != null ? [{ x: 100 * (dense.sparsity ?? 0), y: plotted(m, d) }] : [];
    accChart.options.scales.y.title.text = axisTitle(m, "test");
    Object.assign(accChart.options.scales.y, metricScale(m));
    el.querySelector("#acc-title").textContent = `${m.name[0].toUpperCase()}${m.name.slice(1)} vs sparsity`;
    accChart.update("none");

    // the phase table: every column the API lists for tables (service.records.PHASE_COLUMNS)
    const columns = (phasePage.columns ?? []).filter((c) => c.table);
    el.querySelector("#phase-table").innerHTML = `<table id="phases"><thead><tr><th class="num">phase</th>
      <th class="num">sparsity</th>${columns.map((c) => `<th class="num" title="${esc(c.description)}">${esc(c.label)}</th>`).join("")}
      <th class="num">wall</th></tr></thead><tbody>${phases.map((p) => `<tr data-phase="${p.index}">
      <td class="num">${p.index}</td><td class="num">${pct(p.sparsity)}</td>
      ${columns.map((c) => `<td class="num" data-key="${esc(c.key)}">${phaseCell(m, c.unit, p[c.key])}</td>`).join("")}
      <td class="num">${p.seconds?.total == null ? "–" : seconds(p.seconds.total)}</td></tr>`).join("")}</tbody></table>`;

    timeline.data.labels = phases.map((p) => (p.index === 0 ? "phase 0 (dense)" : `phase ${p.index}`));
    stages.forEach(([, key], i) => {
      timeline.data.datasets[i].data = phases.map((p) => (p.status === "succeeded" && (key === "total") === (p.index === 0) ? p.seconds?.[key] ?? 0 : 0));
    });
    timeline.data.datasets.at(-1).data = phases.map((p) => (p.status === "running" && !job.finished ? since(p.started_at) : 0));
    timeline.update("none");
  }

  // The DAG up to the last finished phase's model, plus, while a phase runs, its finished ingredients
  // (each one's lineage brings in the phase's pruned model)
  async function lineage(job, phases) {
    const last = [...phases].reverse().find((p) => p.model_id);
    const tips = new Set([job.final_model_id || last?.model_id]);
    if (!job.final_model_id) {
      runs.filter((r) => r.kind === "ingredient" && r.phase === job.current_phase && r.model_id)
        .forEach((r) => tips.add(r.model_id));
    }
    tips.delete(undefined);
    if (!tips.size) return;
    const graphs = await Promise.all([...tips].map((id) => api(`/models/${id}/lineage`)));
    const nodes = new Map(graphs.flatMap((g) => g.nodes).map((n) => [n.id, n]));
    const edges = new Map(graphs.flatMap((g) => g.edges).map((e) => [`${e.parent} ${e.child}`, e]));
    drawLineage(el.querySelector("#lineage"), { nodes: [...nodes.values()], edges: [...edges.values()] },
                (m) => modelPanel(el.querySelector("#model-panel"), m));
  }

  function drawSearch(trials) {
    const card = el.querySelector("#search-card");
    card.hidden = trials.length === 0;
    if (!trials.length) return;
    const keys = [...new Set(trials.flatMap((t) => Object.keys(t.searched)))];
    el.querySelector("#search").innerHTML = `<table id="search-trials"><thead><tr><th>phase</th><th>trial</th>
      ${keys.map((k) => `<th>${esc(k)}</th>`).join("")}<th class="num">epochs run</th><th class="num">val accuracy</th><th>status</th></tr></thead><tbody>
      ${trials.map((t) => `<tr class="${t.chosen ? "chosen" : ""}"><td>${t.phase}</td><td>trial${t.index}${t.chosen ? " ★" : ""}</td>
        ${keys.map((k) => { const v = t.searched[k]; return `<td>${typeof v === "number" ? +v.toPrecision(3) : esc(v ?? "")}</td>`; }).join("")}
        <td class="num">${t.epochs_run ?? "–"}</td><td class="num">${pct(t.val_accuracy)}</td>
        <td>${esc(t.stopped_early ? "stopped early" : t.status)}</td></tr>`).join("")}</tbody></table>`;
  }

  async function refresh() {
    const job = await api(`/jobs/${jobId}`);
    jobNow = job;
    el.querySelector("#job-name").textContent = job.name;
    el.querySelector("#job-status").innerHTML = badge(job.status);
    el.querySelector("#cancel").hidden = job.finished;
    const spec = job.spec || {};
    el.querySelector("#job-facts").innerHTML = [
      ["progress", `${bar(job.progress, "big")} <span id="job-progress">${pct(job.progress, 0)}</span>`],
      ["phase", `${job.current_phase ?? "–"} / ${spec.prune?.phases ?? "?"}`],
      ["sparsity", `${pct(job.sparsity)} of ${pct(spec.prune?.target_sparsity)}`],
      [`best ${metricOf(job).name}`, score(metricOf(job), job.best_score, 1)],
      ["model", `${esc(spec.model?.arch)} on ${esc(spec.data?.name)}`],
      ["soup", `${spec.soup?.ingredients} × ${esc(spec.soup?.vary)}, ${esc(spec.soup?.method)}`],
      ["retraining", metricOf(job).name === "perplexity"
        ? `${spec.retrain?.epochs} epochs, ${esc(spec.retrain?.params)}, AdamW` : `${spec.retrain?.epochs} epochs, ${esc(spec.retrain?.schedule)}`],
      ["created", ago(job.created_at)], ["duration", duration(job.started_at, job.finished_at)],
      ["compute", job.cpu_seconds == null ? "–" : `${seconds(job.cpu_seconds)} CPU${job.gpu_seconds ? `, ${seconds(job.gpu_seconds)} GPU` : ""}, ${job.epochs_trained} epochs`],
      ...(job.error ? [["error", `<span class="error">${esc(job.error)}</span>`]] : []),
    ].map(([k, v]) => `<div><span>${k}</span>${v}</div>`).join("");

    const events = await api(`/jobs/${jobId}/events?after=${lastEvent}`);
    if (events.data.length) {
      const box = el.querySelector("#events");
      box.insertAdjacentHTML("beforeend", events.data.map((e) => `<div class="${esc(e.level)}">
        ${new Date(e.time).toLocaleTimeString()} ${e.phase != null ? `[phase ${e.phase}] ` : ""}${esc(e.message)}</div>`).join(""));
      box.scrollTop = box.scrollHeight;
      lastEvent = events.data.at(-1).id;
    }

    const key = `${job.status}|${job.progress}|${job.current_phase}`;
    if (key !== lastKey || job.status === "running") {     // running: the timeline's current bar grows
      const [phases, runPage, search] = await Promise.all([api(`/jobs/${jobId}/phases`), api(`/jobs/${jobId}/runs`),
                                                           api(`/jobs/${jobId}/search`)]);
      runs = runPage.data.filter((r) => r.kind !== "search_trial");
      drawPhases(job, phases, runs.filter((r) => r.kind === "ingredient"));
      await drawRobustness(job, phases.data, phases.columns ?? []);
      drawSearch(search.data);
      if (key !== lastKey) {
        metrics = (await api(`/jobs/${jobId}/metrics`)).data;
        drawCurves();
        await lineage(job, phases.data);
      }
      lastKey = key;
    }
    if (job.finished) {
      if (ended) return false;          // one more round after the end, for the last events
      ended = true;
    }
  }
  await every(1500, refresh);
}

// ------------------------------------------------------------------ job page: one-shot robustness
// The dense model's accuracy after one-shot magnitude pruning to each sparsity of the job's grid (BatchNorm
// recalibrated, no retraining; GET /models/{id}/robustness), against the dense accuracy and the job's soups.
function robustnessCard() {
  return `<div class="card" id="robustness-card"><h2>One-shot robustness</h2>
    <div class="chart"><canvas id="robustness-chart"></canvas></div>
    <p class="muted" id="robustness-note">The dense model pruned once to each sparsity, without retraining.</p></div>`;
}

function robustnessChart(el) {
  const card = el.querySelector("#robustness-card"), note = el.querySelector("#robustness-note");
  const c = chart(el.querySelector("#robustness-chart"), {
    type: "scatter",
    data: { datasets: [
      { label: "one-shot, BN recalibrated", data: [], showLine: true, borderColor: KIND_COLORS.pruned,
        backgroundColor: KIND_COLORS.pruned, pointStyle: "triangle", pointRadius: 5 },
      { label: "one-shot, before BN recalibration", data: [], showLine: true, borderDash: [2, 3], borderColor: "#8a8fa0",
        backgroundColor: "#8a8fa0", pointRadius: 3 },
      { label: "dense", data: [], showLine: true, borderDash: [6, 4], borderColor: KIND_COLORS.dense,
        backgroundColor: KIND_COLORS.dense, pointRadius: 0, borderWidth: 1.5 },
      { label: "soups (retrained)", data: [], showLine: true, borderColor: KIND_COLORS.soup, backgroundColor: KIND_COLORS.soup,
        pointRadius: 4 },
    ] },
    options: lineOptions("sparsity (%)", "test accuracy (%)", { min: 0, max: 100 }),
  });
  let modelId = null, curve = null;
  return async function draw(job, phases, columns) {
    const dense = phases.find((p) => p.index === 0 && p.status === "succeeded" && p.model_id);
    if (!dense) {
      note.textContent = "Measured with the dense model (phase 0).";
      return;
    }
    if (dense.model_id !== modelId) {
      curve = await api(`/models/${dense.model_id}/robustness`);
      modelId = dense.model_id;
    }
    const [oneShot, raw, reference, soups] = c.data.datasets;
    const pts = curve.points ?? [];
    oneShot.data = pts.map((p) => ({ x: 100 * p.sparsity, y: 100 * p.accuracy }));
    raw.data = pts.filter((p) => p.accuracy_raw != null).map((p) => ({ x: 100 * p.sparsity, y: 100 * p.accuracy_raw }));
    raw.hidden = raw.data.length === 0;
    reference.data = pts.length && curve.dense_accuracy != null
      ? [{ x: 0, y: 100 * curve.dense_accuracy }, { x: 100, y: 100 * curve.dense_accuracy }] : [];
    const soupKey = columnKey({ columns }, "soup_{m}");
    soups.data = pts.length && soupKey ? phases.filter((p) => p.index > 0 && p.status === "succeeded" && p[soupKey] != null)
      .map((p) => ({ x: 100 * p.sparsity, y: 100 * p[soupKey] })) : [];
    c.options.scales.y.title.text = `${curve.split ?? "test"} accuracy (%)`;
    c.update("none");
    card.dataset.points = String(pts.length);         // drawn: how many sparsities (0: not measured)
    if (!pts.length) {
      note.textContent = curve.detail ?? "Not measured.";
      return;
    }
    const last = pts.at(-1);
    const within = pts.findIndex((p) => curve.dense_accuracy == null || p.accuracy < curve.dense_accuracy - 0.01);
    const kept = within === -1 ? last : pts[within - 1];     // the highest sparsity before the first bigger loss
    note.textContent = `Dense model ${pct(curve.dense_accuracy)}; after one-shot pruning ${pct(pts[0].accuracy)} at ` +
      `${pct(pts[0].sparsity, 0)}, ${pct(last.accuracy)} at ${pct(last.sparsity, 0)}` +
      (kept ? `; within 1 point of dense up to ${pct(kept.sparsity, 0)}` : "") +
      ` (${curve.split} split${raw.data.length ? ", BatchNorm recalibrated" : ""}, no retraining).`;
  };
}

function legend() {
  return `<div class="legend">${Object.entries(KIND_COLORS).map(([k, c]) => `<span><i data-color="${c}"></i>${k}</span>`).join("")}
    <span>— pruned_from / retrained_from</span><span>- - averaged_from</span></div>`;
}

function drawLineage(svg, graph, onSelect) {
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: "LR", nodesep: 10, ranksep: 46, marginx: 8, marginy: 8 });
  g.setDefaultEdgeLabel(() => ({}));
  const byId = Object.fromEntries(graph.nodes.map((n) => [n.id, n]));
  const label = (n) => (n.kind === "dense" ? "dense" : `p${n.phase} ${n.kind === "ingredient" ? n.name.split("/").pop() : n.kind}`);
  graph.nodes.forEach((n) => g.setNode(n.id, { width: 24 + 6.5 * `${label(n)} · ${modelScore(n)}`.length, height: 30 }));
  graph.edges.forEach((e) => g.setEdge(e.parent, e.child, { kind: e.kind }));
  dagre.layout(g);
  const { width, height } = g.graph();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);          // natural size; CSS scales a wide graph down to fit
  svg.setAttribute("height", height);
  const edges = g.edges().map((e) => {
    const pts = g.edge(e).points;
    const d = `M${pts[0].x},${pts[0].y} ` + pts.slice(1).map((p) => `L${p.x},${p.y}`).join(" ");
    return `<path class="edge ${g.edge(e).kind}" data-parent="${e.v}" data-child="${e.w}" d="${d}" marker-end="url(#arrow)"/>`;
  });
  const nodes = g.nodes().map((id) => {
    const { x, y, width: w, height: h } = g.node(id);
    const n = byId[id];
    return `<g class="node ${n.kind}" data-id="${id}" tabindex="0">
      <title>${esc(n.name)}: sparsity ${pct(n.sparsity)}, ${n.perplexity != null ? "perplexity" : "accuracy"} ${modelScore(n, 2)}</title>
      <rect x="${x - w / 2}" y="${y - h / 2}" width="${w}" height="${h}"></rect>
      <text x="${x}" y="${y + 4}" text-anchor="middle">${esc(label(n))} · ${modelScore(n)}</text></g>`;
  });
  svg.innerHTML = `<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto-start-reverse">
    <path d="M0,0 L10,5 L0,10 z" fill="#9aa2b5"/></marker></defs>${edges.join("")}${nodes.join("")}`;
  svg.querySelectorAll(".node").forEach((node) => {
    const select = () => {
      svg.querySelectorAll(".node.selected").forEach((x) => x.classList.remove("selected"));
      node.classList.add("selected");
      onSelect(byId[node.dataset.id]);
    };
    node.addEventListener("click", select);
    node.addEventListener("keydown", (e) => { if (e.key === "Enter") select(); });
  });
}

function modelPanel(panel, m) {
  panel.hidden = false;
  panel.innerHTML = `<h2>${esc(m.name)}</h2><dl>
    <dt>kind</dt><dd>${esc(m.kind)}</dd><dt>phase</dt><dd>${m.phase}</dd>
    <dt>sparsity</dt><dd>${pct(m.sparsity, 2)}</dd><dt>nonzeros</dt><dd>${m.nonzeros.toLocaleString()}</dd>
    <dt>${m.perplexity != null ? "test perplexity" : "test accuracy"}</dt><dd>${modelScore(m, 2)}</dd><dt>size</dt><dd>${bytes(m.size_bytes)}</dd>
    <dt>sha256</dt><dd><code>${esc(m.sha256.slice(0, 16))}…</code></dd></dl>
    <button id="download">Download checkpoint</button> <a href="#/models/${m.id}">model page</a>`;
  panel.querySelector("#download").onclick = () => download(m).catch(showError);
}

// ------------------------------------------------------------------ model page
async function modelView(el, modelId) {
  el.innerHTML = `<div class="toolbar"><h1 id="model-name">Model</h1></div>
    <div class="lineage-wrap"><div class="card lineage-card"><h2>Lineage</h2>${legend()}<div class="graph"><svg id="lineage" role="img" aria-label="lineage graph"></svg></div></div>
    <div id="model-panel" class="card" hidden></div></div>`;
  const [model, graph] = await Promise.all([api(`/models/${modelId}`), api(`/models/${modelId}/lineage`)]);
  el.querySelector("#model-name").innerHTML = `${esc(model.name)} <span class="muted">of job <a href="#/jobs/${model.job_id}">${model.job_id.slice(0, 8)}</a></span>`;
  const panel = el.querySelector("#model-panel");
  drawLineage(el.querySelector("#lineage"), graph, (m) => modelPanel(panel, m));
  el.querySelector(`#lineage .node[data-id="${modelId}"]`)?.classList.add("selected");
  modelPanel(panel, model);
  const job = await api(`/jobs/${model.job_id}`).catch(() => null);
  const arch = String(job?.spec?.model?.arch ?? "");
  const channels = job?.spec?.prune?.structure === "channels";
  el.insertAdjacentHTML("beforeend", `<div class="card" id="structure" hidden></div><div class="card" id="exports"></div>
    <div class="card" id="inference" hidden></div>`);
  structureCard(el.querySelector("#structure"), model);
  const draw = (m) => exportsCard(el.querySelector("#exports"), el.querySelector("#inference"), m, arch, channels, async (format, button) => {
    await download(m, format, (p) => { button.textContent = `Building on the cluster… ${Math.round(p.seconds)} s`; });
    draw(await api(`/models/${modelId}`));          // the export's size is recorded once it is built
  });
  draw(model);
}

// A model pruned with prune.structure channels (metrics.structure, workers.structured): the share of channels
// removed, and the parameters and MACs of the model once they are taken out (its exports) against its full shape.
function structureCard(card, m) {
  const s = m.metrics?.structure;
  card.hidden = !s;
  if (!s) return;
  const ratio = (a, b) => (b ? `${(a / b).toFixed(2)}×` : "–");
  const perToken = m.perplexity != null ? " per token" : " per example";
  card.innerHTML = `<h2>Structure</h2><div class="facts">
    <div><span>channels removed</span><b id="channels-removed">${pct(s.channels_removed, 1)}</b></div>
    <div><span>parameters</span>${s.dense_parameters.toLocaleString()} → ${s.parameters.toLocaleString()}
      (<b id="parameters-ratio">${ratio(s.parameters, s.dense_parameters)}</b>)</div>
    <div><span>MACs${perToken}</span>${s.dense_macs.toLocaleString()} → ${s.macs.toLocaleString()}
      (<b id="macs-ratio">${ratio(s.macs, s.dense_macs)}</b>)</div></div>
    <p class="muted">Whole channels${m.perplexity != null ? " (MLP neurons, attention KV groups)" : ""} are zero in the
    checkpoint; the ${m.perplexity != null ? "hf" : "onnx and compact"} exports take them out.</p>`;
}

// The model's export formats: the size each takes in the artifact store (metrics.sizes, recorded when an
// export is first built) with its ratio to dense, and a download per format; then, when a benchmark has
// measured it (metrics.inference), the sparse model's latency against the dense one's.
function exportsCard(card, latency, m, arch, channels, fetchFormat) {
  const llm = arch.startsWith("hf:") || m.perplexity != null;
  const formats = EXPORTS.filter((x) => x.llm === undefined || x.llm === llm)
    .filter((x) => !x.channels || channels)
    .filter((x) => !((x.format === "onnx" || x.format === "compact") && arch.startsWith("import:")));
  const sizes = { dense: m.size_bytes, ...(m.metrics?.sizes ?? {}) };
  const rows = formats.map((x) => {
    const size = sizes[x.format];
    const ratio = size != null && sizes.dense ? size / sizes.dense : null;
    return `<tr data-format="${x.format}"><td><b>${x.format}</b></td><td class="muted">${esc(x.what)}</td>
      <td class="num size">${size != null ? bytes(size) : '<span class="muted">built on first download</span>'}</td>
      <td class="num ratio">${ratio != null ? `${ratio.toFixed(3)}×` : "–"}</td>
      <td><button data-format="${x.format}">Download ${x.format}</button></td></tr>`;
  }).join("");
  card.innerHTML = `<h2>Exports</h2><table><thead><tr><th>format</th><th></th><th class="num">stored size</th>
    <th class="num">of dense</th><th></th></tr></thead><tbody>${rows}</tbody></table>
    <p class="muted">Also <code>ladle export ${esc(m.id.slice(0, 8))}… --format sparse -o FILE</code> or
    <code>Client.export(id, "sparse", path)</code>; every download is checked against the server's sha256.</p>`;
  card.querySelectorAll("button[data-format]").forEach((b) => {
    b.onclick = async () => {
      b.disabled = true;
      const label = b.textContent;
      try { await fetchFormat(b.dataset.format, b); } catch (e) { showError(e); } finally { b.disabled = false; b.textContent = label; }
    };
  });
  const inf = m.metrics?.inference;
  latency.hidden = !inf;
  if (inf) {
    const ms = (x) => (x == null ? "–" : `${Number(x).toFixed(2)} ms`);
    latency.innerHTML = `<h2>Inference latency</h2><div class="facts">
      <div><span>device</span>${esc(inf.device)}</div><div><span>sparse layout</span>${esc(inf.layout)}</div>
      ${inf.batch_size != null ? `<div><span>batch</span>${esc(inf.batch_size)}</div>` : ""}
      <div><span>dense</span>${ms(inf.dense_ms)}</div><div><span>sparse</span>${ms(inf.sparse_ms)}</div>
      <div><span>sparse / dense</span><b id="latency-ratio">${inf.latency_ratio == null ? "–" : `${Number(inf.latency_ratio).toFixed(2)}×`}</b></div>
      <div><span>measured</span>${esc(inf.measured_at ?? "–")}</div></div>
      ${inf.command ? `<p class="muted">by <code>${esc(inf.command)}</code></p>` : ""}`;
  }
}

// ------------------------------------------------------------------ cluster page
async function clusterView(el) {
  el.innerHTML = `<h1>Cluster</h1>
    <div class="grid"><div class="card"><h2>Resources in use</h2><table id="resources"></table></div>
    <div class="card"><h2>Nodes</h2><table id="nodes"></table></div></div>
    <div class="card"><h2>Running and queued jobs</h2><table id="active"></table></div>`;
  await every(2000, async () => {
    const [cluster, running, queued] = await Promise.all([
      api("/cluster"), api("/jobs?status=running&limit=100"), api("/jobs?status=queued&limit=100")]);
    const keys = Object.keys(cluster.resources_total).filter((k) => !k.includes("memory") || k === "memory").sort();
    el.querySelector("#resources").innerHTML = `<tr><th>resource</th><th>in use</th><th class="num">used / total</th></tr>` +
      keys.map((k) => {
        const total = cluster.resources_total[k], used = total - (cluster.resources_available[k] ?? total);
        const fmt = (v) => (k.includes("memory") ? bytes(v) : +v.toFixed(2));
        return `<tr data-resource="${esc(k)}"><td>${esc(k)}</td><td>${bar(total ? used / total : 0)}</td><td class="num">${fmt(used)} / ${fmt(total)}</td></tr>`;
      }).join("");
    el.querySelector("#nodes").innerHTML = `<tr><th>node</th><th>address</th><th>state</th><th class="num">CPU</th><th class="num">GPU</th></tr>` +
      cluster.nodes.map((n) => `<tr><td>${esc(n.node_id.slice(0, 12))}${n.head ? " (head)" : ""}</td><td>${esc(n.ip)}</td>
        <td>${esc(n.state)}</td><td class="num">${n.resources?.CPU ?? 0}</td><td class="num">${n.resources?.GPU ?? 0}</td></tr>`).join("");
    const jobs = [...running.data, ...queued.data];
    el.querySelector("#active").innerHTML = `<tr><th>job</th><th>status</th><th>progress</th><th class="num">phase</th><th class="num">age</th></tr>` +
      (jobs.map((j) => `<tr data-job="${j.id}"><td><a href="#/jobs/${j.id}">${esc(j.name)}</a></td><td>${badge(j.status)}</td>
        <td>${bar(j.progress)} ${pct(j.progress, 0)}</td><td class="num">${j.current_phase ?? "–"}</td><td class="num">${ago(j.created_at)}</td></tr>`).join("")
       || `<tr><td colspan="5" class="muted">Nothing running or queued.</td></tr>`);
  });
}

// ------------------------------------------------------------------ router
const ROUTES = [
  [/^#?\/?$/, jobsView, "jobs"],
  [/^#\/jobs\/([\w-]+)$/, jobView, "jobs"],
  [/^#\/compare\?ids=([\w,-]*)$/, compareView, "jobs"],
  [/^#\/models\/([\w-]+)$/, modelView, "jobs"],
  [/^#\/cluster$/, clusterView, "cluster"],
];

async function route() {
  leave.forEach((undo) => undo());
  leave = [];
  const view = document.getElementById("view");
  const hash = location.hash || "#/";
  for (const [pattern, render, nav] of ROUTES) {
    const m = hash.match(pattern);
    if (!m) continue;
    document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
    try { await render(view, ...m.slice(1)); } catch (e) { showError(e); }
    return;
  }
  view.innerHTML = `<p>Nothing at ${esc(hash)}. <a href="#/">All jobs</a></p>`;
}

window.addEventListener("hashchange", route);
whoami().then(route).catch(showError);
