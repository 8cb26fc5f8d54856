// Compiles every non-coop shader variant listed in variants.json (examples/shaders) through the
// browser's WebGPU implementation: one shader module per distinct text (its compilation
// messages), one compute pipeline per variant with its exact override constants. Leaves
// window.tintResult and document.body.dataset.verdict for web/ci/browser.py.
const params = new URLSearchParams(location.search);
const dir = params.get("dir") || "target/shaders/";
const log = (s) => { document.getElementById("log").textContent += s + "\n"; };
const result = { failures: [], warnings: [], texts: 0, pipelines: 0, skipped_f16: 0, skipped_limits: 0, skipped_coop: 0, skipped_cpu: 0 };

async function main() {
  if (!navigator.gpu) throw new Error("no WebGPU in this browser");
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new Error("no WebGPU adapter");
  const info = adapter.info || {};
  result.adapter = `${info.vendor || "?"} ${info.architecture || ""} ${info.device || ""} ${info.description || ""}`.trim();
  const f16 = adapter.features.has("shader-f16");
  result.f16 = f16;
  const names = ["maxComputeWorkgroupStorageSize", "maxComputeInvocationsPerWorkgroup",
    "maxComputeWorkgroupSizeX", "maxStorageBuffersPerShaderStage", "maxStorageBufferBindingSize",
    "maxBufferSize"];
  const requiredLimits = {};
  for (const n of names) requiredLimits[n] = adapter.limits[n];
  result.limits = requiredLimits;
  const device = await adapter.requestDevice({ requiredFeatures: f16 ? ["shader-f16"] : [], requiredLimits });
  device.addEventListener("uncapturederror", (e) => result.failures.push({ variant: "(uncaptured)", message: e.error.message }));
  log(`adapter: ${result.adapter}; shader-f16: ${f16}; workgroup memory ${requiredLimits.maxComputeWorkgroupStorageSize}, invocations ${requiredLimits.maxComputeInvocationsPerWorkgroup}`);

  const list = await (await fetch(dir + "variants.json")).json();
  const modules = new Map();
  for (const v of list.variants) {
    if (v.coop) { result.skipped_coop++; continue; }
    if (v.f16 && !f16) { result.skipped_f16++; continue; }
    if (modules.has(v.text)) continue;
    const code = await (await fetch(dir + v.text)).text();
    const module = device.createShaderModule({ label: v.text, code });
    const ci = await module.getCompilationInfo();
    const msgs = ci.messages.map((m) => `${m.type} at ${v.text}:${m.lineNum}:${m.linePos}: ${m.message}`);
    for (const m of ci.messages) {
      const text = `${m.type} at ${v.text}:${m.lineNum}:${m.linePos}: ${m.message}`;
      if (m.type === "error") result.failures.push({ variant: v.text, message: text });
      else result.warnings.push({ variant: v.text, message: text });
    }
    log(`${v.text}: ${msgs.length} messages`);
    modules.set(v.text, module);
    result.texts++;
  }
  const fits = (v) => v.workgroup_bytes <= requiredLimits.maxComputeWorkgroupStorageSize &&
    v.invocations <= requiredLimits.maxComputeInvocationsPerWorkgroup &&
    v.invocations <= requiredLimits.maxComputeWorkgroupSizeX;
  let todo = list.variants.filter((v) => !v.coop && !(v.f16 && !f16) && fits(v));
  if (params.get("cpu") === "1") {
    // On a CPU adapter (SwiftShader) the decode kernel's pipelines (registers unrolled over
    // the head dim and query rows) take minutes each to compile, so the check would not finish.
    // Their texts are still compiled above (Tint's WGSL checks); the pipelines are not made.
    const heavy = (v) => v.entry === "attend" && /decode/.test(v.text);
    result.skipped_cpu = todo.filter(heavy).length;
    todo = todo.filter((v) => !heavy(v));
  }
  result.skipped_limits = list.variants.filter((v) => !v.coop && !(v.f16 && !f16) && !fits(v)).length;
  result.variants = todo.length;
  if (params.get("cover") === "1") {
    // A covering subset: every distinct text with every entry point and every value of every
    // override constant it is given, at least once (greedy set cover). The full list is the
    // default; CI uses this to keep within its time on a software adapter.
    const pairs = (v) => [`${v.text}|entry=${v.entry}`, ...Object.entries(v.constants).map(([k, x]) => `${v.text}|${v.entry}|${k}=${x}`)];
    const need = new Set(todo.flatMap(pairs));
    const chosen = [];
    while (need.size) {
      let best = null, bestN = 0;
      for (const v of todo) {
        const n = pairs(v).filter((p) => need.has(p)).length;
        if (n > bestN) { best = v; bestN = n; }
      }
      chosen.push(best);
      for (const p of pairs(best)) need.delete(p);
    }
    log(`covering subset: ${chosen.length} of ${todo.length} variants`);
    todo = chosen;
  }
  const batch = 8;
  for (let i = 0; i < todo.length; i += batch) {
    await Promise.all(todo.slice(i, i + batch).map(async (v) => {
      try {
        await device.createComputePipelineAsync({
          label: v.label, layout: "auto",
          compute: { module: modules.get(v.text), entryPoint: v.entry, constants: v.constants },
        });
        result.pipelines++;
      } catch (e) {
        result.failures.push({ variant: v.label, message: String(e && e.message || e) });
      }
    }));
    if (i % 8 === 0) log(`${i} / ${todo.length} variants (${Math.round(performance.now() / 1000)} s)`);
  }
  log(`${result.texts} texts, ${result.pipelines} pipelines created; skipped: ${result.skipped_f16} f16 (no shader-f16), ${result.skipped_limits} over this device's limits, ${result.skipped_coop} cooperative-matrix (naga only), ${result.skipped_cpu} decode attend (compiled as text only on a CPU adapter)`);
  for (const f of result.failures) log(`FAIL ${f.variant}: ${f.message}`);
  result.verdict = result.failures.length === 0 && result.pipelines > 0 ? "pass" : "fail";
}

try { await main(); } catch (e) { result.verdict = "error: " + (e && e.message || e); }
window.tintResult = result;
document.getElementById("verdict").textContent = result.verdict;
document.body.dataset.verdict = result.verdict;
