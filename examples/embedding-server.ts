// An embedding service: one model loaded once, a `node:http` server that answers
// `POST /embed` (the body: an image file's bytes, PNG, JPEG, WebP, ...) with the image's
// embedding as JSON. Requests that arrive together are embedded in one batch: each
// request's image is decoded as it arrives (natively, off the JS thread), then waits at
// most --window-ms for others before the batch goes to the encoder.
//
//   npx tsx examples/embedding-server.ts <model> [--port 8080] [--host 127.0.0.1] [--window-ms 5] [--max-batch 64]
//   curl --data-binary @cat.jpg http://127.0.0.1:8080/embed
//   -> {"embedding":[0.12,...],"dim":768,"batchSize":3}
//
// A body that is no image gets 400 with the library's error code (`E_IMAGE`); other
// paths 404, other methods 405, bodies over 32 MB 413.
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { parseArgs } from 'node:util';
import { MaskedAutoencoder, VitMaeError, preprocess, type Tensor } from 'vit-mae';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: 'string', default: '8080' },
    host: { type: 'string', default: '127.0.0.1' },
    'window-ms': { type: 'string', default: '5' },
    'max-batch': { type: 'string', default: '64' },
  },
});
if (positionals.length !== 1) {
  console.error('usage: embedding-server.ts <model> [--port 8080] [--host 127.0.0.1] [--window-ms 5] [--max-batch 64]');
  process.exit(2);
}
const windowMs = Number(values['window-ms']);
const maxBatch = Number(values['max-batch']);
const MAX_BODY = 32 << 20;

const mae = await MaskedAutoencoder.load(positionals[0]);
const { imgSize, inChans, embedDim } = mae.config;

/** A decoded image waiting for its batch, and how to answer its request. */
interface Pending {
  input: Tensor;
  resolve: (answer: { embedding: number[]; batchSize: number }) => void;
  reject: (error: unknown) => void;
}

const queue: Pending[] = [];
let timer: NodeJS.Timeout | null = null;
let running = false;

/** Embeds up to `maxBatch` waiting images in one call, then the next batch if more wait. */
async function flush(): Promise<void> {
  timer = null;
  if (running || queue.length === 0) return;
  running = true;
  const batch = queue.splice(0, maxBatch);
  const size = imgSize * imgSize * inChans;
  const data = new Float32Array(batch.length * size);
  batch.forEach((p, i) => data.set(p.input.data, i * size));
  try {
    const features = await mae.embed({ data, shape: [batch.length, inChans, imgSize, imgSize] });
    batch.forEach((p, i) => p.resolve({ embedding: Array.from(features.data.subarray(i * embedDim, (i + 1) * embedDim)), batchSize: batch.length }));
  } catch (error) {
    for (const p of batch) p.reject(error);
  } finally {
    running = false;
    if (queue.length > 0) void flush();
  }
}

/** The embedding of one image, batched with whatever arrives within the window. */
async function embed(image: Buffer): Promise<{ embedding: number[]; batchSize: number }> {
  const input = await preprocess(image, { imgSize, inChans });
  return new Promise((resolve, reject) => {
    queue.push({ input, resolve, reject });
    if (queue.length >= maxBatch) void flush();
    else timer ??= setTimeout(() => void flush(), windowMs);
  });
}

function readBody(request: IncomingMessage): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let length = 0;
    request.on('data', (chunk: Buffer) => {
      length += chunk.length;
      if (length > MAX_BODY) {
        resolve(null);
        request.destroy();
      } else chunks.push(chunk);
    });
    request.on('end', () => resolve(Buffer.concat(chunks)));
    request.on('error', reject);
  });
}

function reply(response: ServerResponse, status: number, body: unknown): void {
  response.writeHead(status, { 'content-type': 'application/json' });
  response.end(JSON.stringify(body));
}

const server = createServer(async (request, response) => {
  if (request.url !== '/embed') return reply(response, 404, { error: { code: 'NOT_FOUND', message: 'POST an image to /embed' } });
  if (request.method !== 'POST') return reply(response, 405, { error: { code: 'METHOD_NOT_ALLOWED', message: 'POST an image to /embed' } });
  try {
    const body = await readBody(request);
    if (body === null) return reply(response, 413, { error: { code: 'TOO_LARGE', message: `images of at most ${MAX_BODY} bytes` } });
    const { embedding, batchSize } = await embed(body);
    reply(response, 200, { embedding, dim: embedDim, batchSize });
  } catch (error) {
    const known = error instanceof VitMaeError;
    const client = known && error.code === 'E_IMAGE';
    reply(response, client ? 400 : 500, { error: { code: known ? error.code : 'E_INTERNAL', message: error instanceof Error ? error.message : String(error) } });
  }
});

server.listen(Number(values.port), values.host, () => {
  const address = server.address();
  const port = typeof address === 'object' && address !== null ? address.port : values.port;
  console.log(`embedding ${imgSize}x${imgSize} images into ${embedDim} values at http://${values.host}:${port}/embed`);
});

// Ctrl-C or a supervisor's SIGTERM: stop taking connections, finish the open requests.
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, () => server.close(() => mae.dispose()));
