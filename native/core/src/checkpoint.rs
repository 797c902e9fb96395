//! Reading and writing MAE checkpoints: the published `.pth` (`{"model": state_dict}`,
//! parsed without executing anything), safetensors in the published key layout, and
//! Hugging Face `ViTMAEForPreTraining` and `ViTMAEModel` (encoder-only) folders. Writes
//! are atomic.

use crate::bail;
use crate::config::{ConfigPatch, MaeConfig, TargetName, PCA_COMPONENTS, PCA_MEAN, PRESETS};
use crate::device::Precision;
use crate::error::{candle_message, Error, ErrorCode, Result};
use crate::model::MaskedAutoencoder;
use crate::pth::PthFile;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    Safetensors,
    Pth,
    HuggingFace,
}

impl CheckpointFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointFormat::Safetensors => "safetensors",
            CheckpointFormat::Pth => "pth",
            CheckpointFormat::HuggingFace => "huggingface",
        }
    }
}

/// A checkpoint's tensors under published names, and the config it carries.
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    pub config: Option<ConfigPatch>,
    pub format: CheckpointFormat,
    /// safetensors `__metadata__` (training checkpoints keep their state here).
    pub metadata: HashMap<String, String>,
    /// Tensors the file stores in another floating-point type (f16, bf16, f64), by their
    /// names in the file, with that type; they were converted to f32.
    pub converted: BTreeMap<String, DType>,
}

/// What loading found, besides the model.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub format: CheckpointFormat,
    /// True when the checkpoint held only the encoder and the decoder is freshly initialised.
    pub fresh_decoder: bool,
    /// Weights stored as f16, bf16 or f64 and converted to f32 (names as in the file).
    pub converted: BTreeMap<String, DType>,
    /// Fields of a Hugging Face `config.json` that describe the model and were not
    /// followed (see `hf_ignored_fields`), sorted; empty for other formats.
    pub ignored_config_fields: Vec<String>,
}

pub(crate) fn corrupt(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::CheckpointCorrupt, format!("{} is not a readable checkpoint: {detail}", path.display()))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::new(ErrorCode::Io, format!("cannot read {}: {e}", path.display()))
}

/// Reads every tensor of a checkpoint (as f32, on the CPU) under published names.
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    open_checkpoint(path)?.read(|_| true)
}

/// A checkpoint read up to its tensors' names and shapes. A `.pth` reads a tensor's data
/// only when asked for it, so that its keys can be checked first; safetensors files are
/// read whole (each of their bytes belongs to one tensor).
struct OpenCheckpoint {
    format: CheckpointFormat,
    config: Option<ConfigPatch>,
    ignored_config_fields: Vec<String>,
    metadata: HashMap<String, String>,
    shapes: BTreeMap<String, Vec<usize>>,
    tensors: Tensors,
}

enum Tensors {
    Read { tensors: BTreeMap<String, Tensor>, converted: BTreeMap<String, DType> },
    Pth(PthFile),
}

impl OpenCheckpoint {
    /// The tensors `wanted` accepts, as f32 on the CPU.
    fn read(self, wanted: impl Fn(&str) -> bool) -> Result<StateDict> {
        let (tensors, converted) = match self.tensors {
            Tensors::Read { tensors, converted } => (tensors.into_iter().filter(|(name, _)| wanted(name)).collect(), converted),
            Tensors::Pth(mut pth) => {
                let (mut tensors, mut converted) = (BTreeMap::new(), BTreeMap::new());
                pth.read(wanted, |name, tensor, bytes| {
                    let stored = Tensor::from_raw_buffer(&bytes, tensor.dtype, &tensor.shape, &Device::Cpu)?;
                    if is_converted(tensor.dtype) {
                        converted.insert(name.to_string(), tensor.dtype);
                    }
                    tensors.insert(name.to_string(), stored.to_dtype(DType::F32)?);
                    Ok(())
                })?;
                (tensors, converted)
            }
        };
        Ok(StateDict { tensors, config: self.config, format: self.format, metadata: self.metadata, converted })
    }
}

fn shapes_of(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<usize>> {
    tensors.iter().map(|(name, t)| (name.clone(), t.dims().to_vec())).collect()
}

/// The model holds f32: floating-point tensors are converted, integer and boolean ones
/// refused, except PyTorch's integer buffers (BatchNorm's `num_batches_tracked`), read as
/// f32 as before. `stored_as` names a type candle lacks.
fn checked_dtype(path: &Path, name: &str, dtype: Option<DType>, stored_as: &str) -> Result<DType> {
    match dtype {
        Some(d @ (DType::F32 | DType::F16 | DType::BF16 | DType::F64)) => Ok(d),
        Some(DType::I64) if name.ends_with("num_batches_tracked") => Ok(DType::I64),
        _ => Err(corrupt(
            path,
            format!("tensor {name} is stored as {}; weights must be floating-point (f32, f16, bf16 or f64)", dtype.map_or(stored_as, |d| d.as_str())),
        )),
    }
}

fn is_converted(dtype: DType) -> bool {
    dtype != DType::F32 && dtype.is_float()
}

/// What is at a path, from its metadata, before anything opens it.
enum PathKind {
    File { len: u64 },
    Folder,
}

/// `None` when nothing is at `path`. Anything but a regular file or a folder is refused
/// here: reading `/dev/zero` never ends, and opening a FIFO blocks until a writer comes.
fn path_kind(path: &Path) -> Result<Option<PathKind>> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, e)),
    };
    let file_type = meta.file_type();
    if file_type.is_dir() {
        return Ok(Some(PathKind::Folder));
    }
    if file_type.is_file() {
        return Ok(Some(PathKind::File { len: meta.len() }));
    }
    #[cfg(unix)]
    let kind = {
        use std::os::unix::fs::FileTypeExt;
        match () {
            _ if file_type.is_char_device() => "a character device",
            _ if file_type.is_block_device() => "a block device",
            _ if file_type.is_fifo() => "a FIFO",
            _ if file_type.is_socket() => "a socket",
            _ => "not a regular file",
        }
    };
    #[cfg(not(unix))]
    let kind = "not a regular file";
    Err(Error::new(ErrorCode::CheckpointCorrupt, format!("{} is {kind}, not a checkpoint file", path.display())))
}

fn open_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| io_error(path, e))
}

/// At most `len` bytes of `file` from where it stands: a checkpoint is read no further
/// than the size its metadata gave, even if it grows while it is read.
fn read_up_to(path: &Path, file: &mut std::fs::File, len: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, len), &mut bytes).map_err(|e| io_error(path, e))?;
    Ok(bytes)
}

/// The first bytes of a `torch.save` file from before PyTorch 1.6: a protocol-2 pickle of
/// its magic number, 0x1950a86a20f9469cfc6c.
const LEGACY_TORCH_MAGIC: [u8; 14] = [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The largest safetensors header the format allows (as the safetensors crate).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;
/// How much of a file is read to tell its format.
const SNIFFED_BYTES: u64 = LEGACY_TORCH_MAGIC.len() as u64;

fn open_checkpoint(path: &Path) -> Result<OpenCheckpoint> {
    let len = match path_kind(path)? {
        None => bail!(CheckpointNotFound, "no checkpoint at {}", path.display()),
        Some(PathKind::Folder) => return read_hugging_face(path),
        Some(PathKind::File { len }) => len,
    };
    let mut file = open_file(path)?;
    let head = read_up_to(path, &mut file, SNIFFED_BYTES)?;
    if head.starts_with(b"PK\x03\x04") {
        let pth = PthFile::open(path, file, len, |name, dtype, stored_as| checked_dtype(path, name, dtype, stored_as))?;
        let shapes = pth.tensors.iter().map(|(name, t)| (name.clone(), t.shape.clone())).collect();
        return Ok(OpenCheckpoint { format: CheckpointFormat::Pth, config: None, ignored_config_fields: Vec::new(), metadata: HashMap::new(), shapes, tensors: Tensors::Pth(pth) });
    }
    if head.starts_with(&LEGACY_TORCH_MAGIC) {
        return Err(corrupt(path, "it is a torch.save file in the legacy format of PyTorch before 1.6, which is not read; load it in PyTorch and save it again with a current torch.save"));
    }
    let (tensors, metadata, converted) =
        read_safetensors(path, file, &head, len, "it is not a safetensors file, a zip PyTorch checkpoint or a Hugging Face folder")?;
    let config = match metadata.get("config") {
        Some(json) => {
            let value: serde_json::Value = serde_json::from_str(json).map_err(|e| corrupt(path, format!("metadata config is not JSON: {e}")))?;
            Some(ConfigPatch::from_json(&value, false)?)
        }
        None => None,
    };
    let shapes = shapes_of(&tensors);
    Ok(OpenCheckpoint { format: CheckpointFormat::Safetensors, config, ignored_config_fields: Vec::new(), metadata, shapes, tensors: Tensors::Read { tensors, converted } })
}

type Parsed = (BTreeMap<String, Tensor>, HashMap<String, String>, BTreeMap<String, DType>);

/// A safetensors file of `len` bytes whose first bytes `head` were read from `file`. Its
/// header length must fit the file and the format's limit before the rest is read;
/// `not_safetensors` is what to say of a file that does not start as safetensors do.
fn read_safetensors(path: &Path, mut file: std::fs::File, head: &[u8], len: u64, not_safetensors: &str) -> Result<Parsed> {
    // An 8-byte little-endian header length, then that much JSON.
    match head.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) {
        Some(h) if head.get(8) == Some(&b'{') => {
            if h > len.saturating_sub(8) {
                return Err(corrupt(path, format!("its safetensors header declares {h} bytes but only {} follow (is it truncated?)", len.saturating_sub(8))));
            }
            if h > MAX_SAFETENSORS_HEADER {
                return Err(corrupt(path, format!("its safetensors header declares {h} bytes, more than the {MAX_SAFETENSORS_HEADER} the format allows")));
            }
        }
        _ => return Err(corrupt(path, not_safetensors)),
    }
    std::io::Seek::rewind(&mut file).map_err(|e| io_error(path, e))?;
    parse_safetensors(path, &read_up_to(path, &mut file, len)?)
}

fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(path, e))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(path, e))?;
    let (mut tensors, mut converted) = (BTreeMap::new(), BTreeMap::new());
    for (name, view) in st.tensors() {
        let stored_as = format!("{:?}", view.dtype());
        let dtype = checked_dtype(path, &name, DType::try_from(view.dtype()).ok(), &stored_as)?;
        let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| corrupt(path, format!("tensor {name}: {}", candle_message(&e))))?;
        if is_converted(dtype) {
            converted.insert(name.clone(), dtype);
        }
        tensors.insert(name, tensor.to_dtype(DType::F32)?);
    }
    Ok((tensors, metadata, converted))
}

/// The largest `config.json` read: Hugging Face's are a kilobyte or two.
const MAX_HF_CONFIG_BYTES: u64 = 1 << 20;

fn read_hugging_face(dir: &Path) -> Result<OpenCheckpoint> {
    let file_in = |name: &str| -> Result<(PathBuf, u64)> {
        let path = dir.join(name);
        match path_kind(&path)? {
            Some(PathKind::File { len }) => Ok((path, len)),
            Some(PathKind::Folder) => Err(corrupt(&path, "it is a folder")),
            None => bail!(CheckpointNotFound, "{} is a folder but has no {name} (expected a Hugging Face ViTMAE folder)", dir.display()),
        }
    };
    let (config_path, config_len) = file_in("config.json")?;
    let (weights_path, weights_len) = file_in("model.safetensors")?;
    if config_len > MAX_HF_CONFIG_BYTES {
        return Err(corrupt(&config_path, format!("it is {config_len} bytes; a Hugging Face config.json is a few kilobytes (at most {MAX_HF_CONFIG_BYTES} are read)")));
    }
    let hf: serde_json::Value = serde_json::from_slice(&read_up_to(&config_path, &mut open_file(&config_path)?, config_len)?).map_err(|e| corrupt(&config_path, e))?;
    let config = hf_config(&hf)?;
    let ignored_config_fields = hf_ignored_fields(&hf);
    let mut weights = open_file(&weights_path)?;
    let head = read_up_to(&weights_path, &mut weights, SNIFFED_BYTES)?;
    let (hf_tensors, _, converted) = read_safetensors(&weights_path, weights, &head, weights_len, "it is not a safetensors file")?;
    let tensors = hf_to_published(hf_tensors)?;
    let shapes = shapes_of(&tensors);
    Ok(OpenCheckpoint { format: CheckpointFormat::HuggingFace, config: Some(config), ignored_config_fields, metadata: HashMap::new(), shapes, tensors: Tensors::Read { tensors, converted } })
}

/// The `config.json` fields `hf_config` reads.
const HF_READ_FIELDS: [&str; 15] = [
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "hidden_act",
    "qkv_bias",
    "norm_pix_loss",
    "layer_norm_eps",
];

/// `config.json` fields that say nothing of what the loaded model computes: the file's
/// metadata, and how Transformers initialises a model from scratch (loaded weights do not
/// depend on it; a fresh decoder is initialised as published).
const HF_NOT_MODEL_FIELDS: [&str; 7] = ["architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "initializer_range"];

/// Fields not read whose values here are what this MAE does anyway (no dropout, and
/// `forward`'s and training's default mask ratio); other values are ignored fields.
const HF_FOLLOWED_VALUES: [(&str, f64); 3] = [("hidden_dropout_prob", 0.0), ("attention_probs_dropout_prob", 0.0), ("mask_ratio", 0.75)];

/// The fields of a Hugging Face config that describe the model but are not followed:
/// neither read nor at a value this MAE follows anyway (a `mask_ratio` of 0.6, dropout, a
/// field of a newer Transformers). Loading goes on; the report lists them.
fn hf_ignored_fields(hf: &serde_json::Value) -> Vec<String> {
    let followed = |name: &str, value: &serde_json::Value| HF_FOLLOWED_VALUES.iter().any(|(n, v)| *n == name && value.as_f64() == Some(*v));
    let Some(fields) = hf.as_object() else { return Vec::new() };
    let mut ignored: Vec<String> = fields
        .iter()
        .filter(|(name, value)| !HF_READ_FIELDS.contains(&name.as_str()) && !HF_NOT_MODEL_FIELDS.contains(&name.as_str()) && !followed(name, value))
        .map(|(name, _)| name.clone())
        .collect();
    ignored.sort();
    ignored
}

fn hf_config(hf: &serde_json::Value) -> Result<ConfigPatch> {
    let int = |k: &str| hf.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize);
    if let Some(act) = hf.get("hidden_act").and_then(|v| v.as_str()) {
        if act != "gelu" {
            bail!(InvalidConfig, "Hugging Face config has hidden_act '{act}'; MAE uses exact GELU ('gelu')");
        }
    }
    if hf.get("qkv_bias").and_then(|v| v.as_bool()) == Some(false) {
        bail!(InvalidConfig, "Hugging Face config has qkv_bias false; MAE's attention has a qkv bias");
    }
    let hidden = int("hidden_size");
    let mlp_ratio = match (int("intermediate_size"), hidden) {
        (Some(i), Some(h)) if h > 0 => Some(i as f64 / h as f64),
        _ => None,
    };
    if let (Some(di), Some(dh), Some(ratio)) = (int("decoder_intermediate_size"), int("decoder_hidden_size"), mlp_ratio) {
        if (di as f64 - dh as f64 * ratio).abs() > 0.5 {
            bail!(InvalidConfig, "Hugging Face config's decoder MLP ratio differs from the encoder's; MAE shares one mlp_ratio");
        }
    }
    Ok(ConfigPatch {
        img_size: int("image_size"),
        patch_size: int("patch_size"),
        in_chans: int("num_channels"),
        embed_dim: hidden,
        depth: int("num_hidden_layers"),
        num_heads: int("num_attention_heads"),
        decoder_embed_dim: int("decoder_hidden_size"),
        decoder_depth: int("decoder_num_hidden_layers"),
        decoder_num_heads: int("decoder_num_attention_heads"),
        mlp_ratio,
        norm_pix_loss: hf.get("norm_pix_loss").and_then(|v| v.as_bool()),
        target: None,
        pca_components: None,
        layer_norm_eps: hf.get("layer_norm_eps").and_then(|v| v.as_f64()),
        encoder_mask_token: None,
    })
}

/// The published name of a Hugging Face block parameter (after `layer.N.`).
fn hf_block_suffix(rest: &str) -> Option<&'static str> {
    Some(match rest {
        "layernorm_before.weight" => "norm1.weight",
        "layernorm_before.bias" => "norm1.bias",
        "attention.output.dense.weight" => "attn.proj.weight",
        "attention.output.dense.bias" => "attn.proj.bias",
        "layernorm_after.weight" => "norm2.weight",
        "layernorm_after.bias" => "norm2.bias",
        "intermediate.dense.weight" => "mlp.fc1.weight",
        "intermediate.dense.bias" => "mlp.fc1.bias",
        "output.dense.weight" => "mlp.fc2.weight",
        "output.dense.bias" => "mlp.fc2.bias",
        _ => return None,
    })
}

fn hf_to_published(hf: BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    // (published prefix, "weight"|"bias") -> [query, key, value]
    let mut qkv: BTreeMap<(String, String), [Option<(String, Tensor)>; 3]> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (name, tensor) in hf {
        let key = name.strip_prefix("vit.").unwrap_or(&name);
        let simple = match key {
            "embeddings.cls_token" => Some("cls_token".to_string()),
            "embeddings.position_embeddings" => Some("pos_embed".to_string()),
            "embeddings.patch_embeddings.projection.weight" => Some("patch_embed.proj.weight".to_string()),
            "embeddings.patch_embeddings.projection.bias" => Some("patch_embed.proj.bias".to_string()),
            "layernorm.weight" => Some("norm.weight".to_string()),
            "layernorm.bias" => Some("norm.bias".to_string()),
            "decoder.mask_token" => Some("mask_token".to_string()),
            "decoder.decoder_pos_embed" => Some("decoder_pos_embed".to_string()),
            _ => ["decoder.decoder_embed.", "decoder.decoder_norm.", "decoder.decoder_pred."]
                .iter()
                .find_map(|p| key.strip_prefix(p).map(|rest| format!("{}.{rest}", &p["decoder.".len()..p.len() - 1]))),
        };
        if let Some(published) = simple {
            out.insert(published, tensor);
            continue;
        }
        let block = [("encoder.layer.", "blocks."), ("decoder.decoder_layers.", "decoder_blocks.")].iter().find_map(|(hf_prefix, prefix)| {
            let rest = key.strip_prefix(hf_prefix)?;
            let (index, rest) = rest.split_once('.')?;
            index.parse::<usize>().ok()?;
            Some((format!("{prefix}{index}"), rest.to_string()))
        });
        match block {
            Some((block, rest)) => {
                if let Some(suffix) = hf_block_suffix(&rest) {
                    out.insert(format!("{block}.{suffix}"), tensor);
                } else if let Some(part) = rest.strip_prefix("attention.attention.") {
                    let (which, kind) = part.split_once('.').unwrap_or((part, ""));
                    let slot = match which {
                        "query" => 0,
                        "key" => 1,
                        "value" => 2,
                        _ => {
                            unknown.push(name.clone());
                            continue;
                        }
                    };
                    qkv.entry((block, kind.to_string())).or_default()[slot] = Some((name.clone(), tensor));
                } else {
                    unknown.push(name.clone());
                }
            }
            None => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        bail!(CheckpointKeys, "Hugging Face checkpoint has unknown keys: {unknown:?}");
    }
    for ((block, kind), parts) in qkv {
        match parts {
            [Some((qn, q)), Some((kn, k)), Some((vn, v))] => {
                // The published fused tensor stacks the three along their first dimension.
                if q.rank() == 0 || q.dims() != k.dims() || q.dims() != v.dims() {
                    bail!(
                        CheckpointShape,
                        "Hugging Face tensors {qn} {:?}, {kn} {:?} and {vn} {:?} must have one shape (of rank 1 or more) to form {block}.attn.qkv.{kind}",
                        q.dims(),
                        k.dims(),
                        v.dims()
                    );
                }
                out.insert(format!("{block}.attn.qkv.{kind}"), Tensor::cat(&[q, k, v], 0)?);
            }
            _ => bail!(CheckpointKeys, "Hugging Face checkpoint lacks some of query/key/value {kind} for {block}"),
        }
    }
    Ok(out)
}

/// Key prefix of optimizer state in training checkpoints (`optim.exp_avg.<param>`).
pub const OPTIMIZER_PREFIX: &str = "optim.";

fn is_decoder_key(name: &str) -> bool {
    name == "mask_token" || name.starts_with("decoder_")
}

/// A config from tensor shapes alone. Head counts are not visible in shapes: they
/// come from the preset with the same widths (all published models use 64-d
/// heads in B/L, 80-d in H, and 16 decoder heads).
fn infer_config(shapes: &BTreeMap<String, Vec<usize>>) -> ConfigPatch {
    let dim = |name: &str, i: usize| shapes.get(name).and_then(|s| s.get(i).copied());
    let count_blocks = |prefix: &str| {
        shapes
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
            .collect::<BTreeSet<_>>()
            .len()
    };
    let embed_dim = dim("patch_embed.proj.weight", 0);
    let patch_size = dim("patch_embed.proj.weight", 2);
    let img_size = match (dim("pos_embed", 1), patch_size) {
        (Some(l), Some(p)) => Some(((l.saturating_sub(1)) as f64).sqrt().round() as usize * p),
        _ => None,
    };
    let decoder_embed_dim = dim("decoder_embed.weight", 0);
    let mlp_ratio = match (dim("blocks.0.mlp.fc1.weight", 0), embed_dim) {
        (Some(h), Some(d)) if d > 0 => Some(h as f64 / d as f64),
        _ => None,
    };
    let depth = count_blocks("blocks.");
    let decoder_depth = count_blocks("decoder_blocks.");
    let encoder_preset = PRESETS.iter().map(|(_, c)| c).find(|c| Some(c.embed_dim) == embed_dim);
    let decoder_preset = PRESETS.iter().map(|(_, c)| c).find(|c| Some(c.decoder_embed_dim) == decoder_embed_dim.or(encoder_preset.map(|e| e.decoder_embed_dim)));
    ConfigPatch {
        img_size,
        patch_size,
        in_chans: dim("patch_embed.proj.weight", 1),
        embed_dim,
        depth: (depth > 0).then_some(depth),
        num_heads: encoder_preset.map(|c| c.num_heads),
        decoder_embed_dim: decoder_embed_dim.or(encoder_preset.map(|c| c.decoder_embed_dim)),
        decoder_depth: if decoder_depth > 0 { Some(decoder_depth) } else { encoder_preset.map(|c| c.decoder_depth) },
        decoder_num_heads: decoder_preset.map(|c| c.decoder_num_heads),
        mlp_ratio,
        norm_pix_loss: None,
        // A basis in the file is a PCA target's, of as many components as it has rows.
        target: dim(PCA_COMPONENTS, 0).map(|_| TargetName::Pca),
        pca_components: dim(PCA_COMPONENTS, 0),
        layer_norm_eps: None,
        encoder_mask_token: dim("encoder_mask_token", 2).map(|_| true),
    }
}

fn merge(base: ConfigPatch, over: &ConfigPatch) -> ConfigPatch {
    // `normPixLoss`, `target` and `pcaComponents` are one choice: one that `over` makes
    // replaces the base's (a checkpoint's `norm_pix_loss: true` does not contradict an
    // explicit `target: 'pixels'`), but `normPixLoss: false` alone only says "not
    // normalised pixels", which keeps a PCA target (and the base's coefficient count
    // stays with it, as `ConfigPatch::apply_to` keeps it).
    let target = match (over.target, over.norm_pix_loss) {
        (Some(name), _) => Some(name),
        (None, Some(false)) if base.target == Some(TargetName::Pca) => base.target,
        (None, Some(_)) => None,
        (None, None) => base.target,
    };
    let norm_pix_loss = over.norm_pix_loss.or(if over.target.is_some() { None } else { base.norm_pix_loss });
    let pca_components = over.pca_components.or(if target == Some(TargetName::Pca) { base.pca_components } else { None });
    ConfigPatch {
        img_size: over.img_size.or(base.img_size),
        patch_size: over.patch_size.or(base.patch_size),
        in_chans: over.in_chans.or(base.in_chans),
        embed_dim: over.embed_dim.or(base.embed_dim),
        depth: over.depth.or(base.depth),
        num_heads: over.num_heads.or(base.num_heads),
        decoder_embed_dim: over.decoder_embed_dim.or(base.decoder_embed_dim),
        decoder_depth: over.decoder_depth.or(base.decoder_depth),
        decoder_num_heads: over.decoder_num_heads.or(base.decoder_num_heads),
        mlp_ratio: over.mlp_ratio.or(base.mlp_ratio),
        norm_pix_loss,
        target,
        pca_components,
        layer_norm_eps: over.layer_norm_eps.or(base.layer_norm_eps),
        encoder_mask_token: over.encoder_mask_token.or(base.encoder_mask_token),
    }
}

/// Loads a model. The config is, in increasing priority: what the shapes imply,
/// the checkpoint's own config, and `explicit`; the tensors' names and shapes are then
/// checked against it before any tensor data is read.
pub fn load_model(path: &Path, explicit: Option<&ConfigPatch>, device: &Device, precision: Precision, seed: u64) -> Result<(MaskedAutoencoder, LoadReport)> {
    let checkpoint = open_checkpoint(path)?;
    let ignored_config_fields = checkpoint.ignored_config_fields.clone();
    let mut patch = infer_config(&checkpoint.shapes);
    if let Some(c) = &checkpoint.config {
        patch = merge(patch, c);
    }
    if let Some(c) = explicit {
        patch = merge(patch, c);
    }
    let config = patch.complete().map_err(|e| {
        Error::new(e.code, format!("cannot configure the model from {}: {}; pass the config explicitly", path.display(), e.message))
    })?;
    // A training checkpoint also holds optimizer moments; a model load leaves them.
    let is_model_key = |k: &str| !k.starts_with(OPTIMIZER_PREFIX);
    let shapes = checkpoint.shapes.iter().filter(|(k, _)| is_model_key(k)).map(|(k, s)| (k.clone(), s.clone())).collect();
    // Checked before the model is built or any tensor is read: a config that does not
    // match the checkpoint (or fit in memory) allocates nothing.
    let has_decoder = check_shapes(&config, &shapes)?;
    let mut model = MaskedAutoencoder::new(config, device, precision, seed)?;
    let state = checkpoint.read(is_model_key)?;
    assign(&mut model, state.tensors)?;
    Ok((model, LoadReport { format: state.format, fresh_decoder: !has_decoder, converted: state.converted, ignored_config_fields }))
}

/// The fixed tensors a checkpoint may lack: the position tables (the config gives them),
/// and a PCA target's basis (a model saved before pre-training fitted one).
fn is_optional_buffer(name: &str) -> bool {
    name.ends_with("pos_embed") || name == PCA_MEAN || name == PCA_COMPONENTS
}

/// Checks a checkpoint's names and shapes against the model `config` describes: no
/// unknown keys, every parameter there (the decoder's may all be absent, and the fixed
/// position tables and the PCA basis may be), the PCA basis whole or absent, and every
/// shape as the config says. Returns whether the decoder is there.
fn check_shapes(config: &MaeConfig, shapes: &BTreeMap<String, Vec<usize>>) -> Result<bool> {
    let expected: Vec<(String, Vec<usize>)> = config.parameter_shapes().into_iter().chain(config.buffer_shapes()).collect();
    let unknown: Vec<&String> = shapes.keys().filter(|k| !expected.iter().any(|(n, _)| n == *k)).collect();
    if !unknown.is_empty() {
        bail!(CheckpointKeys, "checkpoint has keys that this MAE does not: {unknown:?}");
    }
    let has_decoder = shapes.keys().any(|k| is_decoder_key(k));
    let missing: Vec<&String> = expected
        .iter()
        .map(|(n, _)| n)
        .filter(|n| !shapes.contains_key(*n) && (has_decoder || !is_decoder_key(n)) && !is_optional_buffer(n))
        .collect();
    if !missing.is_empty() {
        bail!(CheckpointKeys, "checkpoint lacks keys: {missing:?}");
    }
    if shapes.contains_key(PCA_MEAN) != shapes.contains_key(PCA_COMPONENTS) {
        bail!(CheckpointKeys, "checkpoint holds one of {PCA_MEAN} and {PCA_COMPONENTS} without the other: a PCA basis needs both");
    }
    let mismatched: Vec<String> = expected
        .iter()
        .filter_map(|(n, shape)| {
            let stored = shapes.get(n)?;
            (stored != shape).then(|| format!("{n}: checkpoint {stored:?}, config {shape:?}"))
        })
        .collect();
    if !mismatched.is_empty() {
        bail!(CheckpointShape, "checkpoint shapes do not match the config: {}", mismatched.join("; "));
    }
    Ok(has_decoder)
}

/// Copies checked checkpoint tensors (`check_shapes`) into the model.
fn assign(model: &mut MaskedAutoencoder, mut tensors: BTreeMap<String, Tensor>) -> Result<()> {
    let device = model.device().clone();
    for (name, var) in model.params() {
        if let Some(t) = tensors.remove(name) {
            var.set(&t.to_device(&device)?)?;
        }
    }
    for name in ["pos_embed", "decoder_pos_embed"] {
        if let Some(t) = tensors.remove(name) {
            model.set_buffer(name, t)?;
        }
    }
    if let (Some(mean), Some(components)) = (tensors.remove(PCA_MEAN), tensors.remove(PCA_COMPONENTS)) {
        model.set_pca_basis(&mean, &components)?;
    }
    Ok(())
}

/// Creates `dir` if needed and checks that files can be created there (by creating and
/// removing one of a name no other writer uses), so that work whose results go there
/// fails before it starts rather than after.
pub fn check_writable_folder(dir: &Path) -> Result<()> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let io = |e: std::io::Error| Error::new(ErrorCode::Io, format!("cannot write to {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let probe = dir.join(format!(".vit-mae-write-test.{}.{}", std::process::id(), PROBES.fetch_add(1, Ordering::Relaxed)));
    std::fs::OpenOptions::new().write(true).create_new(true).open(&probe).map_err(io)?;
    std::fs::remove_file(&probe).map_err(io)
}

/// Saves in the published key layout with the config in `__metadata__.config`.
/// The file appears whole or not at all (written beside it, then renamed).
pub fn save_model(model: &MaskedAutoencoder, path: &Path) -> Result<()> {
    save_with(model, Vec::new(), HashMap::new(), path)
}

/// `save_model` plus extra tensors and metadata entries (training state).
pub fn save_with(model: &MaskedAutoencoder, extra: Vec<(String, Stored<'_>)>, metadata: HashMap<String, String>, path: &Path) -> Result<()> {
    let params = model.params().iter().map(|(n, v)| (n.clone(), Stored::Tensor(v.as_tensor().clone()))).collect();
    save_weights(&model.config, params, model.buffers(), extra, metadata, path)
}

/// `save_with` for weights held outside a model (a training engine's buffers): the
/// parameters, then the fixed tables, then `extra`.
pub fn save_weights(
    config: &MaeConfig,
    params: Vec<(String, Stored<'_>)>,
    buffers: Vec<(&str, &Tensor)>,
    extra: Vec<(String, Stored<'_>)>,
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let mut tensors = params;
    tensors.extend(buffers.iter().map(|(n, t)| (n.to_string(), Stored::Tensor((*t).clone()))));
    tensors.extend(extra);
    save_tensors(tensors, config.to_published_json(), metadata, path)
}

/// A tensor to write: a candle tensor, or f32 values borrowed from an engine's flat
/// buffers, which are written from where they lie.
pub enum Stored<'a> {
    Tensor(Tensor),
    F32 { values: &'a [f32], shape: Vec<usize> },
}

impl safetensors::View for Stored<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Stored::Tensor(t) => safetensors::View::dtype(t),
            Stored::F32 { .. } => safetensors::Dtype::F32,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Stored::Tensor(t) => t.dims(),
            Stored::F32 { shape, .. } => shape,
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            Stored::Tensor(t) => safetensors::View::data(t),
            // safetensors is little-endian, as are the targets the addon is built for.
            Stored::F32 { values, .. } => std::borrow::Cow::Borrowed(bytemuck::cast_slice(values)),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Stored::Tensor(t) => safetensors::View::data_len(t),
            Stored::F32 { values, .. } => 4 * values.len(),
        }
    }
}

#[cfg(target_endian = "big")]
compile_error!("checkpoints are written in the host's byte order, and safetensors is little-endian");

/// Writes named tensors as safetensors with `config` in `__metadata__.config`,
/// atomically, one tensor at a time (a checkpoint is never whole in memory). The same
/// tensors and metadata always give the same bytes.
pub fn save_tensors(tensors: Vec<(String, Stored<'_>)>, config: serde_json::Value, metadata: HashMap<String, String>, path: &Path) -> Result<()> {
    let mut tensors = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, match t {
            Stored::Tensor(t) => Stored::Tensor(t.to_device(&Device::Cpu)?),
            other => other,
        })))
        .collect::<Result<Vec<_>>>()?;
    // The safetensors crate's layout (by falling dtype alignment, then name). Its writer is
    // not used because it writes the metadata in hash-map order, which differs from run to
    // run; the header here has its keys sorted.
    tensors.sort_by(|(a, x), (b, y)| safetensors::View::dtype(y).cmp(&safetensors::View::dtype(x)).then_with(|| a.cmp(b)));
    let mut metadata: BTreeMap<String, String> = metadata.into_iter().collect();
    metadata.insert("config".to_string(), config.to_string());
    let header = safetensors_header(&tensors, metadata)?;
    write_atomic_with(path, |tmp| {
        let mut file = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        for (_, t) in &tensors {
            file.write_all(&safetensors::View::data(t))?;
        }
        file.flush()
    })
}

/// The JSON header of a safetensors file holding `tensors` in this order, keys sorted,
/// padded with spaces to a multiple of 8 bytes as the format asks.
fn safetensors_header(tensors: &[(String, Stored<'_>)], metadata: BTreeMap<String, String>) -> Result<Vec<u8>> {
    let internal = |e: serde_json::Error| Error::new(ErrorCode::Internal, format!("cannot serialise a checkpoint header: {e}"));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".to_string(), serde_json::to_value(metadata).map_err(internal)?);
    let mut offset = 0;
    for (name, t) in tensors {
        let end = offset + safetensors::View::data_len(t);
        let info = serde_json::json!({ "dtype": safetensors::View::dtype(t), "shape": safetensors::View::shape(t), "data_offsets": [offset, end] });
        header.insert(name.clone(), info);
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&header).map_err(internal)?;
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok(bytes)
}

/// Writes to a temporary file in the same folder, syncs it, and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// A temporary file name part no other write shares, in this process or another: the
/// process id and a per-process count, with random bits for processes of the same id
/// in other PID namespaces (containers) writing to one shared folder.
fn unique_suffix() -> String {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}.{count}.{:016x}", std::process::id(), rand::random::<u64>())
}

/// `write_atomic`, the temporary file written by `write`. Each write has a temporary
/// file of its own, so concurrent writes to one path each rename a whole file over it:
/// the last rename wins, and a reader sees one complete file or another.
fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<()> {
    let io = |e: std::io::Error| Error::new(ErrorCode::Io, format!("cannot write {}: {e}", path.display()));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| Error::new(ErrorCode::InvalidArgument, format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.{}.tmp", file_name.to_string_lossy(), unique_suffix()));
    let result = (|| {
        write(&tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// A checkpoint's PCA basis (`pca_mean`, `pca_components`), when it holds one; nothing
/// else of it is read (beyond what its format must).
pub fn read_pca_basis(path: &Path) -> Result<Option<(Tensor, Tensor)>> {
    let mut state = open_checkpoint(path)?.read(|name| name == PCA_MEAN || name == PCA_COMPONENTS)?;
    Ok(state.tensors.remove(PCA_MEAN).zip(state.tensors.remove(PCA_COMPONENTS)))
}

/// The config a checkpoint implies, for inspection without building the model.
pub fn checkpoint_config(path: &Path) -> Result<MaeConfig> {
    inspect(path)?.config.complete()
}

/// What a checkpoint holds, read without building a model: for files whose config the
/// shapes do not complete (a `.pth` of widths no preset has does not tell its head counts).
pub struct Inspection {
    pub format: CheckpointFormat,
    /// Every tensor, by published name, with its shape.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// The config its metadata gives, over what its shapes imply.
    pub config: ConfigPatch,
}

pub fn inspect(path: &Path) -> Result<Inspection> {
    let checkpoint = open_checkpoint(path)?;
    let mut config = infer_config(&checkpoint.shapes);
    if let Some(c) = &checkpoint.config {
        config = merge(config, c);
    }
    Ok(Inspection { format: checkpoint.format, tensors: checkpoint.shapes.into_iter().collect(), config })
}
