// The official `openai` npm client (pinned in package.json) against polysketch-server's HTTP API:
// completions and chat, whole and streamed (a stream's text must equal the whole response's for
// the same seed), the model list, errors as the client's own error classes, and an aborted
// stream. Prints one JSON object of the texts for http_binary_test.sh to compare with the gRPC
// API's; exits 1 naming the first check that failed.
// Usage: node openai_client_test.mjs <base URL, e.g. https://localhost:8000/v1> <api key> <model>
// (NODE_EXTRA_CA_CERTS=<ca.crt> for a server with a test certificate).
import OpenAI from 'openai';

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60_000 });

function check(ok, what) {
  if (!ok) {
    console.error(`FAIL: ${what}`);
    process.exit(1);
  }
}

async function expectError(promise, status, what) {
  try {
    await promise;
  } catch (e) {
    check(e instanceof OpenAI.APIError, `${what}: not an APIError: ${e}`);
    check(e.status === status, `${what}: status ${e.status}, want ${status}: ${e.message}`);
    return e;
  }
  check(false, `${what}: no error`);
}

const sampling = { max_tokens: 24, temperature: 1, top_k: 50, seed: 11 };
const prompt = 'The quick brown fox';
const messages = [{ role: 'user', content: 'Who made the light?' }];

// Completions, whole and streamed.
const whole = await client.completions.create({ model, prompt, ...sampling });
check(whole.object === 'text_completion', `completion object ${whole.object}`);
check(whole.choices[0].finish_reason === 'length', `finish_reason ${whole.choices[0].finish_reason}`);
check(whole.usage.completion_tokens === 24, `usage ${JSON.stringify(whole.usage)}`);
let streamed = '';
let usage = null;
let chunks = 0;
const stream = await client.completions.create({
  model, prompt, ...sampling, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  chunks++;
  if (chunk.usage) usage = chunk.usage;
  if (chunk.choices.length > 0) streamed += chunk.choices[0].text;
}
check(chunks > 2, `only ${chunks} stream chunks`);
check(streamed === whole.choices[0].text, `stream "${streamed}" != whole "${whole.choices[0].text}"`);
check(usage && usage.completion_tokens === 24, `stream usage ${JSON.stringify(usage)}`);

// Chat, whole and streamed.
const chat = await client.chat.completions.create({ model, messages, ...sampling });
check(chat.object === 'chat.completion', `chat object ${chat.object}`);
check(chat.choices[0].message.role === 'assistant', 'chat role');
let chatStreamed = '';
const chatStream = await client.chat.completions.create({ model, messages, ...sampling, stream: true });
for await (const chunk of chatStream) chatStreamed += chunk.choices[0]?.delta?.content ?? '';
check(chatStreamed === chat.choices[0].message.content,
  `chat stream "${chatStreamed}" != whole "${chat.choices[0].message.content}"`);

// Logprobs.
const scored = await client.completions.create({
  model, prompt, max_tokens: 0, echo: true, logprobs: 1,
});
check(scored.choices[0].logprobs.tokens.length === prompt.length, 'echo logprobs tokens');
check(scored.choices[0].logprobs.token_logprobs[0] === null, 'first echoed token has no logprob');

// The model list.
const models = await client.models.list();
check(models.data.some((m) => m.id === model), `models ${JSON.stringify(models.data)}`);

// Errors: the client's own classes, with the field named.
const bad = await expectError(client.completions.create({ model, prompt, top_p: 0 }), 400, 'top_p 0');
check(bad instanceof OpenAI.BadRequestError && bad.param === 'top_p', `param ${bad.param}`);
await expectError(client.completions.create({ model: 'gpt-4', prompt }), 404, 'unknown model');
const anonymous = new OpenAI({ baseURL, apiKey: 'not-a-valid-token-0000', maxRetries: 0 });
await expectError(anonymous.completions.create({ model, prompt }), 401, 'wrong token');

// A stream the client abandons after its first chunk.
const abandoned = await client.completions.create({ model, prompt, max_tokens: 4000, stream: true });
for await (const chunk of abandoned) {
  check(chunk.choices.length === 1, 'abandoned stream chunk');
  abandoned.controller.abort();
  break;
}

console.log(JSON.stringify({
  completion: whole.choices[0].text,
  chat: chat.choices[0].message.content,
}));
