//! Data-parallel training, evaluation and embedding on two ranks under `mpirun` (CPU,
//! loopback), held against one process: the `rank_*` tests are the ranks' scenarios
//! (see `distributed.rs`), the others launch them and compare what the ranks wrote with
//! the same work done here in one process.
//!
//! Tolerances. Two ranks of 16 images compute each image's loss and gradient exactly as
//! one process of 32 does (masks, drop path and mixing are keyed by image, and the
//! ranks interleave the single process's batch), but the 32 per-image gradients are
//! summed in another order (16 + 16 then the all-reduce's sum, against 32 in a row), so
//! gradients agree to a few f32 ulps, not bit for bit. The loss curves then agree within
//! 1e-5 relative. The weights agree less closely: AdamW divides each gradient by its
//! running RMS, so where a gradient is near zero an ulp of it is a sizeable share of the
//! update (up to the learning rate itself); after 10 steps at a peak rate of 1.25e-3
//! the weights were 3e-5 apart (of a largest weight of 1.0), and are held within 1e-4 of
//! the largest weight. Evaluation counts are integers, summed exactly: top-1 and
//! top-5 are equal, not close.

use crate::common::{Fault, Faulty, TempDir};
use crate::distributed::{acting_as, launch_test, Job, OnDeath};
use crate::{finetune as ft, train as pt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use vit_mae_core::data::{Dataset, Loader, LoaderOptions, Shard};
use vit_mae_core::distributed::{Distributed, Group};
use vit_mae_core::finetune::{embed_dataset, evaluate, finetune, Embedder, FinetuneConfig};
use vit_mae_core::recipe::Recipe;
use vit_mae_core::train::{pretrain, PretrainConfig, TrainEvent};
use vit_mae_core::{load_model, read_state_dict, ErrorCode, Precision};

const STEPS: u64 = 10;
/// The global batch: 2 ranks of 16, or one process of 32.
const GLOBAL_BATCH: usize = 32;
const DIR: &str = "VIT_MAE_TEST_DIR";

/// Batches of `data` (pre-training's 16x16 images) without augmentation.
fn loader(data: Arc<dyn Dataset>, batch_size: usize, shuffle: bool, drop_last: bool, shard: Shard) -> Loader {
    loader_of(data, pt::augment(), batch_size, shuffle, drop_last, shard)
}

/// Batches of labelled `data` (fine-tuning's 8x8 images).
fn labelled(data: Arc<dyn Dataset>, batch_size: usize, shuffle: bool, drop_last: bool, shard: Shard) -> Loader {
    loader_of(data, ft::augment(), batch_size, shuffle, drop_last, shard)
}

fn loader_of(data: Arc<dyn Dataset>, augment: vit_mae_core::data::Augment, batch_size: usize, shuffle: bool, drop_last: bool, shard: Shard) -> Loader {
    let options = LoaderOptions { batch_size, seed: 5, shuffle, drop_last, workers: 1, prefetch: 2, skip_corrupt: false, shard };
    Loader::new(data, augment, options).unwrap()
}

fn shard_of(group: &Group) -> Shard {
    Shard { rank: group.rank(), ranks: group.size() }
}

/// The rank scenarios' group: MPI, with a short timeout so that a lost rank is noticed
/// within the tests' time.
fn join() -> Group {
    Group::join(Distributed::Mpi, Duration::from_secs(10)).unwrap()
}

fn scenario_dir() -> PathBuf {
    PathBuf::from(std::env::var(DIR).expect("the driver names a folder"))
}

fn launch(name: &str, dir: &Path, on_death: OnDeath) -> Job {
    launch_test("data_parallel", name, &[(DIR, dir.to_str().unwrap())], 2, on_death, Duration::from_secs(240))
}

fn pretrain_config(checkpoint_dir: Option<PathBuf>) -> PretrainConfig {
    let defaults = PretrainConfig::default();
    let recipe = Recipe { epochs: 4.0, blr: 1e-2, warmup_epochs: 1.0, min_lr: 1e-5, clip_grad: Some(1.0), seed: 3, max_steps: Some(STEPS), checkpoint_dir, checkpoint_every: 1, keep_last: 100, ..defaults.recipe };
    PretrainConfig { recipe, ..defaults }
}

/// 96 images: 3 steps an epoch at 32.
fn pretrain_data() -> Arc<dyn Dataset> {
    Arc::new(pt::dataset(96, 1234))
}

fn losses(events: &[TrainEvent]) -> Vec<f64> {
    events.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect()
}

fn print_losses(rank: usize, losses: &[f64]) {
    println!("rank {rank}: losses={}", losses.iter().map(|l| format!("{l:e}")).collect::<Vec<_>>().join(","));
}

fn said_losses(job: &Job, rank: usize) -> Vec<f64> {
    job.said(rank, "losses").split(',').map(|l| l.parse().unwrap()).collect()
}

fn assert_curves_agree(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs(), "{what}: step {} loss {g} against {w}", step + 1);
    }
}

/// Every weight of `got` within 1e-4 of the largest of `want`'s.
fn assert_weights_agree(got: &[(String, candle_core::Var)], want: &[(String, candle_core::Var)], what: &str) {
    let values = |params: &[(String, candle_core::Var)]| -> Vec<Vec<f32>> { params.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect() };
    let (got, want) = (values(got), values(want));
    assert_eq!(got.len(), want.len());
    let largest = want.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().flatten().zip(want.iter().flatten()).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(worst <= 1e-4 * largest, "{what}: weights differ by up to {worst} (largest weight {largest})");
}

// ---------------------------------------------------------------- pre-training

#[test]
fn rank_pretraining() {
    if !acting_as("rank_pretraining") {
        return;
    }
    let group = join();
    // Each rank builds another model: training starts from rank 0's, broadcast.
    let mut model = pt::tiny_model(51 + group.rank() as u64);
    let loader = loader(pretrain_data(), GLOBAL_BATCH / group.size(), true, true, shard_of(&group));
    let mut events = Vec::new();
    let summary = pretrain(&mut model, &loader, &pretrain_config(Some(scenario_dir())), None, &group, &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
    print_losses(group.rank(), &losses(&events));
    println!("rank {}: images={}", group.rank(), summary.images_seen);
}

#[test]
fn two_ranks_of_16_pretrain_as_one_process_of_32_and_resume_on_another_rank_count() {
    let dir = TempDir::new("data-parallel-pretraining");
    let job = launch("rank_pretraining", dir.path(), OnDeath::EndTheJob);
    assert!(job.succeeded(), "{}", job.describe());
    let alone_dir = TempDir::new("data-parallel-pretraining-alone");
    let mut alone = pt::tiny_model(51);
    let mut events = Vec::new();
    let single = loader(pretrain_data(), GLOBAL_BATCH, true, true, Shard::default());
    pretrain(&mut alone, &single, &pretrain_config(Some(alone_dir.path().to_path_buf())), None, &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();

    // Both ranks report the same (global) curve, one process's.
    assert_curves_agree(&said_losses(&job, 0), &losses(&events), "2 x 16 against 1 x 32");
    assert_eq!(said_losses(&job, 0), said_losses(&job, 1), "the ranks' curves");
    assert_eq!(job.said(0, "images"), (STEPS as usize * GLOBAL_BATCH).to_string());
    // Rank 0 alone wrote the checkpoints, one per step.
    let checkpoint = |dir: &Path, step: u64| dir.join(format!("checkpoint-{step:08}.safetensors"));
    let (parallel, _) = load_model(&checkpoint(dir.path(), STEPS), None, &candle_core::Device::Cpu, Precision::F32, 0).unwrap();
    assert_weights_agree(parallel.params(), alone.params(), "2 x 16 against 1 x 32 after 10 steps");
    let state = read_state_dict(&checkpoint(dir.path(), STEPS)).unwrap();
    assert!(state.metadata["train_state"].contains("\"ranks\":2"), "{}", state.metadata["train_state"]);

    // The same global batch resumes on one rank, from the middle of the run, and ends
    // where the two-rank run did; another global batch is refused.
    let mut resumed = pt::tiny_model(0);
    let mut events = Vec::new();
    pretrain(&mut resumed, &single, &pretrain_config(None), Some(&checkpoint(dir.path(), 5)), &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
    assert_curves_agree(&losses(&events), &said_losses(&job, 0)[5..], "resumed on 1 x 32");
    assert_weights_agree(resumed.params(), parallel.params(), "resumed on 1 x 32 against 2 x 16");
    let half = loader(pretrain_data(), GLOBAL_BATCH / 2, true, true, Shard::default());
    let e = pretrain(&mut pt::tiny_model(0), &half, &pretrain_config(None), Some(&checkpoint(dir.path(), 5)), &Group::single(), &mut |_| {}, &AtomicBool::new(false)).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert!(e.message.contains("batchSize 16 on 1 rank(s) (a global batch of 16): it was written with batchSize 16 on 2 rank(s) (a global batch of 32)"), "{}", e.message);
}

#[test]
fn rank_pca_pretraining() {
    if !acting_as("rank_pca_pretraining") {
        return;
    }
    let group = join();
    let mut model = pt::tiny_pca_model(51 + group.rank() as u64);
    let loader = loader(pretrain_data(), GLOBAL_BATCH / group.size(), true, true, shard_of(&group));
    let mut events = Vec::new();
    pretrain(&mut model, &loader, &pretrain_config(None), None, &group, &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
    print_losses(group.rank(), &losses(&events));
    // A file, not a printed line: the ranks' long lines could interleave on the way out.
    let bytes: Vec<u8> = basis_values(&model).iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(scenario_dir().join(format!("basis-{}.bin", group.rank())), bytes).unwrap();
}

/// A PCA model's mean patch, then its axes.
fn basis_values(model: &vit_mae_core::MaskedAutoencoder) -> Vec<f32> {
    let basis = model.pca_basis().expect("a fitted basis");
    [&basis.mean, &basis.components].iter().flat_map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// The ranks fit the PCA basis on the same images as one process (the whole data's, not
/// their shards'), agree on it to the bit, and train as one process does.
#[test]
fn two_ranks_fit_one_pca_basis_and_pretrain_as_one_process() {
    let dir = TempDir::new("data-parallel-pca");
    let job = launch("rank_pca_pretraining", dir.path(), OnDeath::EndTheJob);
    assert!(job.succeeded(), "{}", job.describe());
    let rank_basis = |rank: usize| -> Vec<f32> {
        let bytes = std::fs::read(dir.path().join(format!("basis-{rank}.bin"))).unwrap();
        bytes.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let parallel = rank_basis(0);
    assert_eq!(parallel.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), rank_basis(1).iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "the ranks' bases");
    let mut alone = pt::tiny_pca_model(51);
    let mut events = Vec::new();
    let single = loader(pretrain_data(), GLOBAL_BATCH, true, true, Shard::default());
    pretrain(&mut alone, &single, &pretrain_config(None), None, &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
    // The same images, summed in batches of 16 there and 32 here: within f32 rounding.
    let here = basis_values(&alone);
    assert_eq!(parallel.len(), here.len());
    let worst = parallel.iter().zip(&here).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst <= 1e-5, "the ranks' basis and one process's differ by up to {worst}");
    assert_curves_agree(&said_losses(&job, 0), &losses(&events), "pca: 2 x 16 against 1 x 32");
}

// ---------------------------------------------------------------- fine-tuning, evaluation, embeddings

fn finetune_config() -> FinetuneConfig {
    let mut config = FinetuneConfig::defaults(vit_mae_core::finetune::Protocol::Finetune);
    config.recipe = Recipe { epochs: 4.0, lr: Some(2e-3), warmup_epochs: 1.0, seed: 9, max_steps: Some(STEPS), ..config.recipe };
    config.mixup = 0.8;
    config.cutmix = 1.0;
    config.drop_path = 0.1;
    config
}

/// 96 labelled images: 3 steps an epoch at 32.
fn labelled_data() -> Arc<dyn Dataset> {
    Arc::new(ft::bright_dark_dataset(96, 77))
}

/// 37 images: shards of 19 and 18, batches of 8 leave a short last one on each.
fn evaluation_data() -> Arc<dyn Dataset> {
    Arc::new(ft::bright_dark_dataset(37, 78))
}

#[test]
fn rank_finetuning_evaluation_and_embedding() {
    if !acting_as("rank_finetuning_evaluation_and_embedding") {
        return;
    }
    let group = join();
    let rank = group.rank();
    let classifier = ft::classifier(2, 2, true, false, 11 + rank as u64);
    let train = labelled(labelled_data(), GLOBAL_BATCH / group.size(), true, true, shard_of(&group));
    let mut events = Vec::new();
    finetune(&classifier, &train, None, &finetune_config(), None, &group, &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
    print_losses(rank, &losses(&events));

    let eval = labelled(evaluation_data(), 8, false, false, shard_of(&group));
    let e = evaluate(&classifier, &eval, &group, &mut |_| {}, &AtomicBool::new(false)).unwrap();
    println!("rank {rank}: evaluation={},{},{}", e.count, e.top1, e.top5);
    let embeddings = embed_dataset(&Embedder::Classifier(&classifier), &eval, &group, &mut |_| {}, &AtomicBool::new(false)).unwrap();
    embeddings.save(&scenario_dir().join(format!("embeddings-{rank}.safetensors"))).unwrap();
    if rank == 0 {
        vit_mae_core::classifier::save_classifier(&classifier, Vec::new(), Default::default(), &scenario_dir().join("classifier.safetensors")).unwrap();
    }
}

#[test]
fn two_ranks_fine_tune_with_mixing_evaluate_and_embed_as_one_process() {
    let dir = TempDir::new("data-parallel-finetuning");
    let job = launch("rank_finetuning_evaluation_and_embedding", dir.path(), OnDeath::EndTheJob);
    assert!(job.succeeded(), "{}", job.describe());

    let alone = ft::classifier(2, 2, true, false, 11);
    let mut events = Vec::new();
    let train = labelled(labelled_data(), GLOBAL_BATCH, true, true, Shard::default());
    finetune(&alone, &train, None, &finetune_config(), None, &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
    assert_curves_agree(&said_losses(&job, 0), &losses(&events), "fine-tuning with mixup and cutmix, 2 x 16 against 1 x 32");

    // The trained classifiers agree as the pre-trained MAEs do; evaluated with the
    // weights rank 0 ended with, the two ranks' counts are exactly one process's.
    let (parallel, _) = vit_mae_core::classifier::load_classifier(&dir.path().join("classifier.safetensors"), None, &candle_core::Device::Cpu, Precision::F32, 0).unwrap();
    assert_weights_agree(parallel.params(), alone.params(), "fine-tuning, 2 x 16 against 1 x 32 after 10 steps");
    let eval = labelled(evaluation_data(), 8, false, false, Shard::default());
    let e = evaluate(&parallel, &eval, &Group::single(), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    for rank in 0..2 {
        assert_eq!(job.said(rank, "evaluation"), format!("{},{},{}", e.count, e.top1, e.top5), "rank {rank}'s evaluation");
    }
    let embeddings = embed_dataset(&Embedder::Classifier(&parallel), &eval, &Group::single(), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    for rank in 0..2 {
        let gathered = candle_core::safetensors::load(dir.path().join(format!("embeddings-{rank}.safetensors")), &candle_core::Device::Cpu).unwrap();
        let indices: Vec<i64> = gathered["indices"].to_vec1().unwrap();
        assert_eq!(indices, (0..37).collect::<Vec<_>>(), "rank {rank}: every image once, in dataset order");
        let features: Vec<f32> = gathered["embeddings"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(features.len(), embeddings.features.len());
        let worst = features.iter().zip(&embeddings.features).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-5, "rank {rank}: embeddings differ by {worst}");
    }
}

// ---------------------------------------------------------------- faults

/// Rank 1's shard of step 3 holds a NaN image (unshuffled, rank 1 takes the odd
/// positions: its batch 2 is images 17, 19, 21, 23); rank 0's holds none.
#[test]
fn rank_nan_on_one_rank() {
    if !acting_as("rank_nan_on_one_rank") {
        return;
    }
    let group = join();
    let data = Faulty { inner: pt::dataset(96, 1234), bad: (0..96).map(|i| i == 17).collect(), fault: Fault::NanPixel };
    let loader = loader(Arc::new(data), 4, false, true, shard_of(&group));
    let e = pretrain(&mut pt::tiny_model(51), &loader, &pretrain_config(Some(scenario_dir())), None, &group, &mut |_| {}, &AtomicBool::new(false)).unwrap_err();
    println!("rank {}: error={}", group.rank(), e.code.as_str());
    println!("rank {}: message={}", group.rank(), e.message);
}

#[test]
fn a_non_finite_loss_on_one_rank_stops_every_rank_with_its_code() {
    let dir = TempDir::new("data-parallel-nan");
    let job = launch("rank_nan_on_one_rank", dir.path(), OnDeath::EndTheJob);
    assert!(job.succeeded(), "{}", job.describe());
    for rank in 0..2 {
        assert_eq!(job.said(rank, "error"), "E_NON_FINITE_LOSS", "rank {rank}");
    }
    assert!(job.said(1, "message").starts_with("loss is NaN at step 3"), "{}", job.said(1, "message"));
    assert!(job.said(0, "message").starts_with("rank 1 of 2 failed (step 3): loss is NaN at step 3"), "{}", job.said(0, "message"));
    // The last good checkpoint is step 2's, written by rank 0 before the failure.
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.contains(&"checkpoint-00000002.safetensors".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("00000003")), "{names:?}");
}

/// Rank 1 is killed (SIGKILL) once step 4 is done; rank 0 goes on into step 5's
/// collectives and must not wait for it forever.
#[test]
fn rank_killed_mid_run() {
    if !acting_as("rank_killed_mid_run") {
        return;
    }
    let group = join();
    let rank = group.rank();
    let loader = loader(pretrain_data(), GLOBAL_BATCH / group.size(), true, true, shard_of(&group));
    let started = std::time::Instant::now();
    let e = pretrain(
        &mut pt::tiny_model(51),
        &loader,
        &pretrain_config(Some(scenario_dir())),
        None,
        &group,
        &mut |e| {
            if let (1, TrainEvent::Checkpoint { step: 4, .. }) = (rank, &e) {
                // SAFETY: ends this process, as a crash or an OOM kill would.
                unsafe { libc::raise(libc::SIGKILL) };
            }
        },
        &AtomicBool::new(false),
    )
    .unwrap_err();
    println!("rank {rank}: error={}", e.code.as_str());
    println!("rank {rank}: seconds={}", started.elapsed().as_secs_f64());
}

#[test]
fn a_killed_rank_stops_the_other_within_the_timeout_and_the_last_checkpoint_resumes() {
    let dir = TempDir::new("data-parallel-kill");
    // A launcher that lets the survivor run (srun's default; mpirun --enable-recovery):
    // the collective's timeout (10 s here) ends it. (Under mpirun's default, mpirun
    // itself ends the job about a second after a rank dies.)
    let job = launch("rank_killed_mid_run", dir.path(), OnDeath::KeepTheOthers);
    assert!(job.status.is_some(), "{}", job.describe());
    assert_eq!(job.said(0, "error"), "E_DISTRIBUTED", "{}", job.describe());
    assert!(job.value(1, "error").is_none(), "rank 1 was killed: {}", job.describe());
    let seconds: f64 = job.said(0, "seconds").parse().unwrap();
    assert!(seconds < 60.0, "rank 0 took {seconds} s to give up on rank 1");

    // The newest checkpoint, written atomically by rank 0, loads and resumes on one
    // process with the same global batch.
    let newest = vit_mae_core::train::list_checkpoints(dir.path()).pop().expect("a checkpoint");
    assert!(newest.ends_with("checkpoint-00000004.safetensors") || newest.ends_with("checkpoint-00000005.safetensors"), "{}", newest.display());
    load_model(&newest, None, &candle_core::Device::Cpu, Precision::F32, 0).unwrap();
    let single = loader(pretrain_data(), GLOBAL_BATCH, true, true, Shard::default());
    let summary = pretrain(&mut pt::tiny_model(0), &single, &pretrain_config(None), Some(&newest), &Group::single(), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(summary.steps, STEPS);
}
