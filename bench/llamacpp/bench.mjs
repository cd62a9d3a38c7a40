// llama.cpp's batch-1 prefill and decode on one GGUF, through node-llama-cpp's prebuilt CPU binary
// (bench/vs_llamacpp.sh runs it; bench/llamacpp/setup installs the pinned package). Never builds
// and never downloads: getLlama gets build "never", skipDownload and gpu false, and fails rather
// than fall back. Prints one JSON line per context:
//   node bench/llamacpp/bench.mjs --model m.gguf --contexts 1024,4096 --threads 2 [--steps 8]
// Prefill: one sequence evaluates `context` random token ids (batch 512), timed. Decode: then
// steps + 2 greedy tokens one at a time (logits and sampling included), the first two warm-up;
// the mean step is reported (and the median), like polysketch-bench. Memory per sequence: the KV
// cache rows of `context` tokens (layers x 2 x width x the cache type's bytes), llama.cpp's own state size of
// the sequence after prefill, and the process's resident set.
import {readFileSync} from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

function parseArgs(argv) {
  const args = {contexts: "1024", threads: 1, steps: 8, kv: "F16", batch: 512};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "");
    if (!(key in args) && key !== "model") throw new Error(`unknown flag ${argv[i]}`);
    if (i + 1 >= argv.length) throw new Error(`${argv[i]} needs a value`);
    args[key] = argv[i + 1];
  }
  if (!args.model) throw new Error("--model FILE.gguf is needed");
  args.contexts = String(args.contexts).split(",").map(Number);
  args.threads = Number(args.threads);
  args.steps = Number(args.steps);
  args.batch = Number(args.batch);
  for (const n of [...args.contexts, args.threads, args.steps, args.batch]) {
    if (!Number.isInteger(n) || n < 1) throw new Error(`not a positive integer: ${n}`);
  }
  if (!["F16", "F32", "Q8_0"].includes(args.kv)) throw new Error(`--kv ${args.kv}: F16, F32 or Q8_0`);
  return args;
}

function rssBytes() {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"));
  return m ? Number(m[1]) * 1024 : null;
}

const kvTypeBytes = {F16: 2, F32: 4, Q8_0: 34 / 32};

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let cpuBackend = null;
  let flashAttention = null;  // what "auto" resolved to, from llama.cpp's log
  const llama = await getLlama({
    gpu: false, build: "never", skipDownload: true, usePrebuiltBinaries: true,
    progressLogs: false, logLevel: LlamaLogLevel.debug, maxThreads: args.threads,
    logger: (level, message) => {
      // Which of the binary's CPU variants ggml picked for this processor (e.g. zen4).
      const m = /loaded CPU backend from .*libggml-cpu-([\w-]+)\.so/.exec(message);
      if (m) cpuBackend = m[1];
      const fa = /Flash Attention (enabled|disabled)/.exec(message);
      if (fa) flashAttention = fa[1] === "enabled";
      if (level === LlamaLogLevel.error || level === LlamaLogLevel.fatal) console.error(message);
    },
  });
  const model = await llama.loadModel({modelPath: args.model, gpuLayers: 0, useMmap: false});
  const info = model.fileInfo.metadata;
  const arch = info.general.architecture;
  const nLayers = Number(info[arch].block_count);
  const width = Number(info[arch].embedding_length);
  const vocab = model.fileInfo.metadata.tokenizer.ggml.tokens.length;
  let seed = 7;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) % vocab;
  for (const context of args.contexts) {
    flashAttention = null;
    const ctx = await model.createContext({
      contextSize: context + args.steps + 8, batchSize: Math.min(args.batch, context),
      threads: {ideal: args.threads, min: args.threads}, sequences: 1,
      experimentalKvCacheKeyType: args.kv, experimentalKvCacheValueType: args.kv,
    });
    const seq = ctx.getSequence();
    const prompt = Array.from({length: context}, random);
    const rssBefore = rssBytes();
    let start = process.hrtime.bigint();
    await seq.evaluateWithoutGeneratingNewTokens(prompt);
    const prefillS = Number(process.hrtime.bigint() - start) / 1e9;
    const stateBytes = ctx.stateSize;
    const times = [];
    let last = process.hrtime.bigint();
    const generator = seq.evaluate([random()], {temperature: 0, yieldEogToken: true});
    for await (const _token of generator) {
      const now = process.hrtime.bigint();
      times.push(Number(now - last) / 1e9);
      last = now;
      if (times.length === args.steps + 2) break;
    }
    const decode = times.slice(2);
    const stepS = decode.reduce((a, b) => a + b, 0) / decode.length;  // mean: tokens/s of a stream
    decode.sort((a, b) => a - b);
    const medianS = decode[Math.floor(decode.length / 2)];
    console.log(JSON.stringify({
      side: "llama.cpp", model: args.model.split("/").pop(), file_bytes: model.size,
      threads: args.threads, cpu_backend: cpuBackend,
      context, prefill_s: prefillS, prefill_tokens_per_s: context / prefillS,
      step_ms: stepS * 1e3, median_step_ms: medianS * 1e3, decode_tokens_per_s: 1 / stepS,
      kv_type: args.kv, flash_attention: flashAttention,
      kv_bytes_per_seq: Math.round(context * nLayers * 2 * width * kvTypeBytes[args.kv]),
      llama_state_bytes: stateBytes, rss_bytes: rssBytes(), rss_before_prefill_bytes: rssBefore,
      context_size: ctx.contextSize, n_layers: nLayers, width, vocab,
    }));
    await ctx.dispose();
  }
  await model.dispose();
  await llama.dispose();
}

main().catch((e) => {
  console.error(`bench.mjs: ${e.message}`);
  process.exit(1);
});
