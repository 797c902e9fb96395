/** The settings of a ViT encoder, shared by {@link MaeConfig} and {@link ClassifierConfig}. */
export interface EncoderConfig {
  /** Input image side, in pixels (images are square). */
  imgSize: number;
  /** Patch side, in pixels; `imgSize` must be a multiple of it. */
  patchSize: number;
  /** Image channels. */
  inChans: number;
  /** Encoder width. */
  embedDim: number;
  /** Encoder blocks. */
  depth: number;
  /** Encoder attention heads. */
  numHeads: number;
  /** MLP hidden width as a multiple of the block width (published: 4). */
  mlpRatio: number;
  /** LayerNorm epsilon (published: 1e-6). */
  layerNormEps: number;
}

/**
 * A model's architecture: the arguments of the published `MaskedAutoencoderViT`,
 * camelCased. Checkpoint metadata may use either spelling.
 */
export interface MaeConfig extends EncoderConfig {
  /** Decoder width. */
  decoderEmbedDim: number;
  /** Decoder blocks. */
  decoderDepth: number;
  /** Decoder attention heads. */
  decoderNumHeads: number;
  /**
   * Whether the loss targets per-patch normalised pixels (the published flag): true
   * exactly when `target` is `'normPixels'`. As input it names the target too (true:
   * `'normPixels'`; false: `'pixels'`, or keeps a `'pca'` target); given with a `target`
   * it contradicts, it is `E_CONFIG`.
   */
  normPixLoss: boolean;
  /**
   * What the decoder predicts for each removed patch, as the paper's Table 1d compares:
   * its pixels, its pixels normalised by their own mean and std (as `normPixLoss`), or
   * its `pcaComponents` leading PCA coefficients (`(patch - mean) @ components^T`). A
   * `'pca'` model's basis (the mean patch and the components, kept in checkpoints as
   * `pca_mean` and `pca_components`) is fitted when pre-training starts, in f64, on
   * the first 256 images of the training data's first epoch (all of them when fewer);
   * until then its forward pass, loss and reconstruction are `E_CONFIG`. Configs the
   * library returns name it only for `'pca'` (for the pixel targets `normPixLoss`
   * says which); absent means `'pixels'` or `'normPixels'` as `normPixLoss` says.
   */
  target?: Target;
  /**
   * The PCA coefficients a `'pca'` target keeps, from 1 to a patch's
   * `patchSize² × inChans` values; by default an eighth of them (at least 1): the
   * paper's 96 of 768 for 16×16 RGB patches. Only with `target: 'pca'`.
   */
  pcaComponents?: number;
  /**
   * The paper's Table 1c ablation, not the published model: the encoder also takes
   * the removed patches, each replaced by a learned `encoder_mask_token` (plus its
   * position embedding), and the decoder gets every patch from the encoder. It costs
   * the speed that skipping them buys. Absent means false.
   */
  encoderMaskToken?: boolean;
}

/** What an MAE's decoder predicts for each removed patch (see {@link MaeConfig.target}). */
export type Target = 'pixels' | 'normPixels' | 'pca';

/**
 * Built-in configurations: the paper's three (`mae_vit_base_patch16`,
 * `mae_vit_large_patch16`, `mae_vit_huge_patch14`, all with a 512-d, 8-block,
 * 16-head decoder) and smaller ones that train on a CPU.
 */
export type PresetName =
  | 'mae_vit_base_patch16'
  | 'mae_vit_large_patch16'
  | 'mae_vit_huge_patch14'
  | 'mae_vit_small_patch16'
  | 'mae_vit_tiny_patch16'
  | 'mae_vit_tiny_patch8_64'
  | 'mae_vit_fmnist_patch4_32';

/**
 * Where a model computes: `'cpu'`, `'cuda'` (the first GPU), `'cuda:N'`, or
 * `'auto'` (a GPU when one works, else the CPU). In a process an MPI launcher started
 * (`mpirun`, `srun`), `'cuda'` and `'auto'` take the GPU of its local rank (modulo the
 * GPUs it sees), so the ranks on a machine use its GPUs one each.
 */
export type Device = 'auto' | 'cpu' | 'cuda' | `cuda:${number}`;

/**
 * The arithmetic a model computes in. Weights, gradients and optimizer state are f32
 * either way. `'bf16'` is mixed precision as PyTorch's bf16 autocast: linear layers
 * and attention's products run in bf16 (the GPU's fast path), while the residual
 * stream, LayerNorm, softmax and the loss stay f32. On the CPU bf16 is slower than
 * f32; use it on CUDA.
 */
export type Precision = 'f32' | 'bf16';

/**
 * A classifier's architecture: the arguments of the published `VisionTransformer`
 * (`models_vit.py`), camelCased, plus the linear probe's BatchNorm head.
 */
export interface ClassifierConfig extends EncoderConfig {
  /** Classes the head predicts. */
  numClasses: number;
  /**
   * Mean of the patch tokens, then `fc_norm` (published fine-tuning; the model has no
   * final `norm`); false: the cls token after `norm`.
   */
  globalPool: boolean;
  /** A `BatchNorm1d(affine=False, eps=1e-6)` before the head, as the published linear probe (keys `head.0.*`, `head.1.*`). */
  headBatchNorm: boolean;
}
