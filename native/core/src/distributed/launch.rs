//! Which launcher started this process, from the variables it sets, read before MPI is
//! loaded: `'auto'` loads MPI only under a launcher that started several processes.

use crate::error::{Error, ErrorCode, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// Open MPI's `mpirun` (4 and 5): `OMPI_COMM_WORLD_SIZE`.
    OpenMpi,
    /// A PMI-1/PMI-2 launcher (MPICH's hydra `mpiexec`, `srun --mpi=pmi2`): `PMI_SIZE`.
    Pmi,
    /// Slurm's `srun`: `SLURM_STEP_NUM_TASKS`, set for a job step only. `SLURM_NTASKS`
    /// is not read: a batch script has it too (and `SLURM_PROCID=0`) although it runs
    /// as one process.
    Slurm,
    /// A PMIx launcher that says no process count (`PMIX_RANK` alone).
    Pmix,
}

impl Launcher {
    /// The launcher and the variable that showed it, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Launcher::OpenMpi => "Open MPI's mpirun (OMPI_COMM_WORLD_SIZE)",
            Launcher::Pmi => "a PMI launcher such as MPICH's mpiexec (PMI_SIZE)",
            Launcher::Slurm => "srun (SLURM_STEP_NUM_TASKS)",
            Launcher::Pmix => "a PMIx launcher (PMIX_RANK)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    /// How many processes the launcher started, when it says.
    pub size: Option<usize>,
}

impl Launch {
    /// Whether the launcher started (or may have started) more than one process.
    pub fn is_parallel(&self) -> bool {
        self.size.is_none_or(|size| size > 1)
    }
}

/// The launcher that started this process, if any, from the environment variable `var`
/// gives. Open MPI's come first: `mpirun` run inside a Slurm job passes the job's
/// variables on to every rank.
pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    for (launcher, size_variable) in [(Launcher::OpenMpi, "OMPI_COMM_WORLD_SIZE"), (Launcher::Pmi, "PMI_SIZE"), (Launcher::Slurm, "SLURM_STEP_NUM_TASKS")] {
        if let Some(value) = var(size_variable) {
            let size = value.trim().parse::<usize>().ok().filter(|&size| size > 0).ok_or_else(|| {
                Error::new(ErrorCode::Distributed, format!("{size_variable}={value} is not a process count, so the launcher cannot be trusted"))
            })?;
            return Ok(Some(Launch { launcher, size: Some(size) }));
        }
    }
    Ok(var("PMIX_RANK").map(|_| Launch { launcher: Launcher::Pmix, size: None }))
}

/// This process's index among those its launcher started on this machine, from the
/// variable `var` gives: Open MPI's, MPICH hydra's, PMIx's or srun's. Read before MPI is
/// loaded, to pick a GPU before the model is made.
pub fn local_rank(var: impl Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "SLURM_LOCALID"].iter().find_map(|name| var(name)?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_in(env: &[(&str, &str)]) -> Result<Option<Launch>> {
        detect(|name| env.iter().find(|(key, _)| *key == name).map(|(_, value)| value.to_string()))
    }

    fn launched(launcher: Launcher, size: Option<usize>) -> Option<Launch> {
        Some(Launch { launcher, size })
    }

    #[test]
    fn local_rank_from_each_launcher() {
        let local_rank_in = |env: &[(&str, &str)]| local_rank(|name| env.iter().find(|(key, _)| *key == name).map(|(_, value)| value.to_string()));
        assert_eq!(local_rank_in(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3"), ("SLURM_LOCALID", "0")]), Some(3));
        assert_eq!(local_rank_in(&[("MPI_LOCALRANKID", "1")]), Some(1));
        assert_eq!(local_rank_in(&[("PMIX_LOCAL_RANK", "2")]), Some(2));
        assert_eq!(local_rank_in(&[("SLURM_LOCALID", "7")]), Some(7));
        assert_eq!(local_rank_in(&[("SLURM_LOCALID", "x")]), None);
        assert_eq!(local_rank_in(&[]), None);
    }

    #[test]
    fn each_launcher_is_known_by_the_process_count_it_sets() {
        assert_eq!(detect_in(&[]).unwrap(), None);
        let open_mpi = [("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0"), ("PMIX_RANK", "2")];
        assert_eq!(detect_in(&open_mpi).unwrap(), launched(Launcher::OpenMpi, Some(4)));
        assert_eq!(detect_in(&[("PMI_SIZE", "2"), ("PMI_RANK", "1")]).unwrap(), launched(Launcher::Pmi, Some(2)));
        let srun = [("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_NTASKS", "8"), ("SLURM_PROCID", "5"), ("PMIX_RANK", "5")];
        assert_eq!(detect_in(&srun).unwrap(), launched(Launcher::Slurm, Some(8)));
        assert_eq!(detect_in(&[("PMIX_RANK", "0")]).unwrap(), launched(Launcher::Pmix, None));
    }

    #[test]
    fn only_several_processes_make_a_parallel_launch() {
        assert!(!Launch { launcher: Launcher::OpenMpi, size: Some(1) }.is_parallel());
        assert!(Launch { launcher: Launcher::Slurm, size: Some(2) }.is_parallel());
        // PMIx alone does not say how many: MPI will.
        assert!(Launch { launcher: Launcher::Pmix, size: None }.is_parallel());
    }

    #[test]
    fn a_batch_script_is_no_launch_and_mpirun_in_a_slurm_job_is_open_mpi() {
        // sbatch --ntasks=4 runs its script once, with the job's task count and rank 0.
        let batch = [("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("SLURM_JOB_ID", "7")];
        assert_eq!(detect_in(&batch).unwrap(), None);
        let mpirun_in_job = [("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0"), ("OMPI_COMM_WORLD_SIZE", "4")];
        assert_eq!(detect_in(&mpirun_in_job).unwrap(), launched(Launcher::OpenMpi, Some(4)));
    }

    #[test]
    fn a_count_that_is_no_count_is_named() {
        for value in ["abc", "0", "-2", ""] {
            let e = detect_in(&[("OMPI_COMM_WORLD_SIZE", value)]).unwrap_err();
            assert_eq!(e.code, ErrorCode::Distributed);
            assert_eq!(e.message, format!("OMPI_COMM_WORLD_SIZE={value} is not a process count, so the launcher cannot be trusted"));
        }
    }
}
