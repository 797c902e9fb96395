import type { MaskingStrategy } from './index.js';
import type { AugmentOptions, DatasetSource, LoaderOptions } from './data.js';
import { VitMaeError } from './errors.js';
import { call, type Binding } from './native.js';
import type { DistributedOptions, PassOptions } from './common.js';

/** What every training recipe (pre-training, fine-tuning) takes besides its own settings. */
export interface RecipeOptions extends LoaderOptions, DistributedOptions {
  /** The training images (labelled, for fine-tuning). */
  data: DatasetSource;
  /** Micro-batches per optimizer step. Default 1. */
  accumIter?: number;
  /** Absolute learning rate (overrides `blr`). */
  lr?: number;
  /** Clip the global gradient norm to this value. Default: no clipping. */
  clipGrad?: number;
  /** Seeds data order, augmentation and the recipe's randomness (masks, drop path, mixing). Default 0. */
  seed?: number;
  /** Stop after this many optimizer steps in total. */
  maxSteps?: number;
  /** Folder for checkpoints (model, optimizer, position); none without it. */
  checkpointDir?: string;
  /** Write a checkpoint every this many steps (and always at the end). Default 0: only at the end. */
  checkpointEvery?: number;
  /** Checkpoints to keep. Default 3. */
  keepLast?: number;
  /** Continue from a training checkpoint file, or the newest one in a folder. */
  resume?: string;
  /**
   * Stops the run after the current step, leaving a checkpoint (before the first step:
   * ended, aborted, with none). A signal already aborted when the run is started is
   * refused at once with `E_ABORTED`, as `evaluate` and `embedDataset` refuse one.
   */
  signal?: AbortSignal;
  /** Called with every event. If it throws, the run stops (after its current step, with a checkpoint) and `result` rejects with that error. */
  onProgress?: (event: TrainingEvent) => void;
}

/** Options for {@link MaskedAutoencoder.pretrain}; defaults follow `main_pretrain.py`. */
export interface PretrainOptions extends RecipeOptions {
  /** Augmentation and normalisation. */
  augment?: AugmentOptions;
  /** Epochs (sets the schedule's length); a fraction ends the last epoch early, at the nearest whole step. Default 400. */
  epochs?: number;
  /** Base learning rate; `lr = blr * batchSize * accumIter / 256`. Default 1.5e-4. */
  blr?: number;
  /** Final learning rate of the cosine. Default 0. */
  minLr?: number;
  /** Linear warm-up epochs. Default 40 (fractions allowed). */
  warmupEpochs?: number;
  /** AdamW weight decay (not applied to 1-D parameters and biases). Default 0.05. */
  weightDecay?: number;
  /** AdamW betas, a pair. Default [0.9, 0.95]. */
  betas?: [number, number];
  /** Fraction of patches removed. Default 0.75. */
  maskRatio?: number;
  /** Masking strategy. Default 'random'. */
  masking?: MaskingStrategy;
}

/**
 * The run started: always its first event. `rank` of `worldSize` processes training
 * together (0 of 1 alone); `batchSize` is per rank, so a step trains on
 * `batchSize * accumIter * worldSize` images.
 */
export interface StartedEvent {
  /** Which event this is. */
  type: 'started';
  /** This process's rank, from 0. */
  rank: number;
  /** Processes training together. */
  worldSize: number;
  /** This process's rank among those on its machine (which GPU it takes). */
  localRank: number;
  /** How the ranks talk: 'none' alone, else 'mpi' (whose GPU ranks average gradients through NCCL). */
  backend: string;
}

/** A step finished. */
export interface StepEvent {
  /** Which event this is. */
  type: 'step';
  /** The epoch the step belongs to (from 0). */
  epoch: number;
  /** Optimizer steps taken so far. */
  step: number;
  /** Steps the run will take in all. */
  totalSteps: number;
  /** Mean loss of the step's micro-batches. */
  loss: number;
  /** The learning rate the step used. */
  lr: number;
  /** Training throughput of this run so far. */
  imagesPerSec: number;
  /** Estimated seconds to the end of the run. */
  etaSeconds: number;
}

/** A checkpoint was written. */
export interface CheckpointEvent {
  /** Which event this is. */
  type: 'checkpoint';
  /** Steps taken when it was written. */
  step: number;
  /** The checkpoint file. */
  path: string;
}

/** Unreadable images were left out of a batch. */
export interface SkippedEvent {
  /** Which event this is. */
  type: 'skipped';
  /** Steps taken when they were met. */
  step: number;
  /** How many were left out. */
  count: number;
  /** What was wrong with the first of them. */
  message: string;
}

/** An epoch finished. */
export interface EpochEndEvent {
  /** Which event this is. */
  type: 'epochEnd';
  /** The epoch that ended (from 0). */
  epoch: number;
  /** Mean step loss over the epoch. */
  meanLoss: number;
}

/** Accuracy on the evaluation set after an epoch (fine-tuning with `evalData`). */
export interface EvalEvent {
  /** Which event this is. */
  type: 'eval';
  /** The epoch that ended (from 0). */
  epoch: number;
  /** Fraction of images whose label is the top prediction. */
  top1: number;
  /** Fraction whose label is among the five top predictions. */
  top5: number;
  /** Mean cross-entropy (no smoothing). */
  loss: number;
}

/**
 * A `'pca'` target's basis was fitted before the first step (pre-training of a model
 * that had none; a resumed run keeps its checkpoint's).
 */
export interface PcaBasisEvent {
  /** Which event this is. */
  type: 'pcaBasis';
  /** The principal axes kept (`pcaComponents`). */
  components: number;
  /** The fraction of the sampled patches' variance those axes hold. */
  keptVariance: number;
  /** Images the basis was fitted on. */
  images: number;
  /** Their patches. */
  patches: number;
}

/** What a training run reports. */
export type TrainingEvent = StartedEvent | StepEvent | CheckpointEvent | SkippedEvent | EpochEndEvent | EvalEvent | PcaBasisEvent;

/** How a run ended. */
export interface TrainingSummary {
  /** Optimizer steps taken in all (including before a resume). */
  steps: number;
  /** Epochs finished. */
  epochsCompleted: number;
  /** Loss of the last step (NaN if none ran). */
  finalLoss: number;
  /** Images trained on in all. */
  imagesSeen: number;
  /** Wall-clock seconds of this run. */
  seconds: number;
  /** True when stopped by the AbortSignal. */
  aborted: boolean;
  /** The newest checkpoint written or resumed from, if any. */
  lastCheckpoint: string | null;
  /** Unreadable images skipped. */
  skippedImages: number;
}

/** The event that ends a native job, by kind of job. */
type JobEnd = Extract<Binding.NativeJobEvent, { type: 'trained' | 'evaluated' | 'embedded' }>;

/** What a native job reports before it ends. */
type JobProgress = Exclude<Binding.NativeJobEvent, JobEnd>;

function isEnd(event: Binding.NativeJobEvent): event is JobEnd {
  return event.type === 'trained' || event.type === 'evaluated' || event.type === 'embedded';
}

function endsAs<End extends JobEnd['type']>(event: JobEnd, end: End): event is Extract<JobEnd, { type: End }> {
  return event.type === end;
}

/**
 * Pulls a native job's events until it ends, forwarding each to `onEvent`; `signal`
 * aborts it. Resolves with its last event, which must be of type `end`. If `onEvent`
 * throws, the job is stopped (training after its current step, with a checkpoint) and
 * waited for before the promise rejects with that error, so that nothing goes on
 * running, or holds its model, after the caller has failed.
 */
export async function runJob<End extends JobEnd['type']>(
  job: Binding.NativeJob,
  end: End,
  signal: AbortSignal | undefined,
  onEvent: (event: JobProgress) => void,
): Promise<Extract<JobEnd, { type: End }>> {
  const abort = () => job.abort();
  if (signal?.aborted) abort();
  signal?.addEventListener('abort', abort, { once: true });
  try {
    for (;;) {
      const event = await call(() => job.nextEvent());
      if (isEnd(event)) {
        if (endsAs(event, end)) return event;
        throw new VitMaeError('E_INTERNAL', `a job expected to end with '${end}' ended with '${event.type}'`);
      }
      try {
        onEvent(event);
      } catch (error) {
        await stopJob(job);
        throw error;
      }
    }
  } finally {
    signal?.removeEventListener('abort', abort);
  }
}

/** Aborts a job and waits for its thread to finish, whatever it ends with. */
async function stopJob(job: Binding.NativeJob): Promise<void> {
  job.abort();
  for (;;) {
    const event = await job.nextEvent().catch(() => null);
    if (event === null || isEnd(event)) return;
  }
}

/** `runJob`'s `onEvent` for a pass over a dataset: its start to `onStarted`, its progress to `onProgress(done, total)`. */
export function forwardProgress({ onStarted, onProgress }: Pick<PassOptions, 'onStarted' | 'onProgress'>): (event: JobProgress) => void {
  return (event) => {
    if (event.type === 'started') onStarted?.(event);
    else if (event.type === 'progress') onProgress?.(event.images, event.totalImages);
  };
}

function toEvent(event: JobProgress): TrainingEvent {
  if (event.type === 'progress') throw new VitMaeError('E_INTERNAL', 'a training run reported a pass progress event');
  return event;
}

/**
 * A training run in progress (pre-training or fine-tuning): iterate it for events,
 * and await {@link TrainingRun.result} for the summary. Training runs on a native
 * thread; the event loop stays free.
 */
export class TrainingRun implements AsyncIterable<TrainingEvent> {
  /** Resolves with the summary when the run ends; rejects with a VitMaeError if it fails. */
  readonly result: Promise<TrainingSummary>;
  readonly #native: Binding.NativeJob;
  readonly #buffered: TrainingEvent[] = [];
  #wake: (() => void) | null = null;
  #ended = false;

  /** @internal Created by `pretrain` and `finetune`. */
  constructor(native: Binding.NativeJob, onProgress?: (event: TrainingEvent) => void, signal?: AbortSignal) {
    this.#native = native;
    this.result = runJob(native, 'trained', signal, (next) => {
      const event = toEvent(next);
      onProgress?.(event);
      this.#buffered.push(event);
      this.#wake?.();
    })
      .then(({ summary }) => ({ ...summary, lastCheckpoint: summary.lastCheckpoint ?? null }))
      .finally(() => {
        this.#ended = true;
        this.#wake?.();
      });
    // The iterator reports failures through `result`; don't also warn about an unhandled rejection.
    this.result.catch(() => {});
  }

  /**
   * Stops after the current step, leaving a checkpoint of where it stopped (before the
   * first step, it ends aborted with no step taken and no checkpoint written).
   */
  abort(): void {
    this.#native.abort();
  }

  /** The run's events in order; ends when the run does, throwing its error if it failed. */
  async *[Symbol.asyncIterator](): AsyncIterator<TrainingEvent> {
    for (;;) {
      const event = this.#buffered.shift();
      if (event) {
        yield event;
        continue;
      }
      if (this.#ended) {
        await this.result;
        return;
      }
      await new Promise<void>((resolve) => (this.#wake = resolve));
      this.#wake = null;
    }
  }
}
