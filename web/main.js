// Drives the wasm build (pkg/, made by web/build.sh): adapter, validation, benchmark, JSON.
// The verdict is also left on document.body.dataset.verdict ("pass" / "fail" / "error: ...")
// and the report on window.selattnReport, for the headless-browser test (web/ci/browser.py).
import init, { adapter_json, validate, bench, version } from "./pkg/selattn_web.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let report = null;

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}
const fmt = (x, d = 2) => (x === null || x === undefined ? "—" : Number(x).toExponential(d));

function validationRow(r) {
  const tr = document.createElement("tr");
  cell(tr, r.dtype); cell(tr, r.variant); cell(tr, r.case); cell(tr, r.kernel);
  cell(tr, r.error ? "—" : fmt(r.max_abs)); cell(tr, r.error ? "—" : fmt(r.rel_norm));
  const skipped = r.pass && r.error;
  cell(tr, skipped ? r.error : r.pass ? "pass" : "FAIL" + (r.error ? ": " + r.error : ""),
       skipped ? "skip" : r.pass ? "pass" : "fail");
  cell(tr, r.ms.toFixed(1));
  $("validation").tBodies[0].appendChild(tr);
}

function benchRow(r) {
  const tr = document.createElement("tr");
  cell(tr, r.case); cell(tr, r.dtype);
  cell(tr, r.ms === null ? "—" : r.ms.toFixed(3));
  cell(tr, r.tflops === null ? "—" : r.tflops.toFixed(4));
  cell(tr, r.error || "", r.error ? "fail" : "");
  $("bench").tBodies[0].appendChild(tr);
}

async function run() {
  $("run").disabled = true; $("save").disabled = true;
  document.body.dataset.verdict = "";
  $("validation").tBodies[0].innerHTML = ""; $("bench").tBodies[0].innerHTML = "";
  // ?level=0 is the smoke test CI runs; otherwise the checkbox picks quick (1) or full (2).
  const level = params.has("level") ? Number(params.get("level")) : $("quick").checked ? 1 : 2;
  report = { selattn: version(), userAgent: navigator.userAgent, date: new Date().toISOString(), level };
  try {
    if (!navigator.gpu) throw new Error("this browser has no WebGPU (navigator.gpu is undefined)");
    $("verdict").textContent = "requesting a WebGPU device…";
    // What the browser itself says about its adapter (wgpu's AdapterInfo is mostly empty on
    // the web), then what selattn's context sees.
    const a = await navigator.gpu.requestAdapter();
    if (!a) throw new Error("navigator.gpu.requestAdapter() returned no adapter");
    const info = a.info || {};
    const limits = {};
    for (const k of ["maxComputeWorkgroupStorageSize", "maxComputeInvocationsPerWorkgroup",
      "maxStorageBuffersPerShaderStage", "maxStorageBufferBindingSize", "maxBufferSize",
      "maxComputeWorkgroupsPerDimension"]) limits[k] = a.limits[k];
    report.browser_adapter = {
      vendor: info.vendor, architecture: info.architecture, device: info.device,
      description: info.description, subgroupMinSize: info.subgroupMinSize,
      subgroupMaxSize: info.subgroupMaxSize, features: [...a.features].sort(), limits,
    };
    report.adapter = JSON.parse(await adapter_json());
    $("adapter").textContent = "browser: " + JSON.stringify(report.browser_adapter, null, 2) +
      "\nselattn: " + JSON.stringify(report.adapter, null, 2);
    $("verdict").textContent = "validating…";
    const rows = JSON.parse(await validate(level, (s) => validationRow(JSON.parse(s))));
    report.validation = rows;
    const failed = rows.filter((r) => !r.pass).length;
    if (params.get("bench") !== "0") {
      $("verdict").textContent = "benchmarking…";
      report.bench = JSON.parse(await bench(Number(params.get("iters") || 10), (s) => benchRow(JSON.parse(s))));
    }
    const ran = rows.filter((r) => !(r.pass && r.error)).length;
    report.verdict = failed === 0 ? "pass" : "fail";
    $("verdict").textContent = failed === 0
      ? `PASS: ${ran} calls agree with the reference (${rows.length - ran} skipped)`
      : `FAIL: ${failed} of ${rows.length} calls disagree with the reference`;
    $("verdict").className = failed === 0 ? "pass" : "fail";
  } catch (e) {
    report.verdict = "error: " + (e && e.message ? e.message : String(e));
    $("verdict").textContent = report.verdict;
    $("verdict").className = "fail";
  }
  window.selattnReport = report;
  document.body.dataset.verdict = report.verdict;
  $("run").disabled = false; $("save").disabled = false;
}

$("save").onclick = () => {
  const blob = new Blob([JSON.stringify(report, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "selattn-browser-report.json";
  a.click();
};
$("run").onclick = run;
if (params.get("quick") === "1") $("quick").checked = true;

await init();
await run();
