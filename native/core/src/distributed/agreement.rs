//! How the ranks of a group agree on the outcome of work each of them does: a training
//! step's micro-batches, a checkpoint, a resume, an evaluation. A rank whose work failed
//! must not simply return: the others would wait for it in the next collective until
//! the timeout. So every rank reports success or failure in one small all-reduce, and
//! when any failed, every rank fails with the same error code: a failed rank with its
//! own error, the others with the first failed rank's, naming it.

use super::Group;
use crate::error::{Error, ErrorCode, Result};

impl Group {
    /// `local` when every rank's work succeeded; else an error of the first failed
    /// rank's code on every rank (see the module's documentation). Alone, `local`.
    pub fn agree<T>(&self, local: Result<T>, what: &str) -> Result<T> {
        match local {
            Ok(value) => self.agree_sum(Ok([]), what).map(|[]| value),
            // A failed rank's own outcome always comes back as an error.
            Err(e) => Err(self.agree_sum::<0>(Err(e), what).expect_err("a failed rank fails")),
        }
    }

    /// The sums over the ranks of `local`'s values when every rank's work succeeded,
    /// in the same all-reduce that tells whether one failed; else an error of the first
    /// failed rank's code on every rank. Alone, `local`.
    pub fn agree_sum<const N: usize>(&self, local: Result<[f64; N]>, what: &str) -> Result<[f64; N]> {
        if self.size() == 1 {
            return local;
        }
        // [failed ranks, values...]: a failed rank contributes zeros.
        let mut sums = vec![0.0; N + 1];
        match &local {
            Ok(values) => sums[1..].copy_from_slice(values),
            Err(_) => sums[0] = 1.0,
        }
        self.all_reduce_sum_f64(&mut sums, what)?;
        if sums[0] == 0.0 {
            return Ok(sums[1..].try_into().expect("N values"));
        }
        let mine = local.as_ref().err().map(encode).unwrap_or_default();
        let reports = self.all_gather(&mine, what)?;
        if let Err(own) = local {
            return Err(own);
        }
        let (rank, error) = reports
            .iter()
            .enumerate()
            .find(|(_, report)| !report.is_empty())
            .map(|(rank, report)| (rank, decode(report)))
            .ok_or_else(|| Error::new(ErrorCode::Internal, format!("{what}: a rank reported a failure but sent no error")))?;
        Err(Error::new(error.code, format!("rank {rank} of {} failed ({what}): {}", self.size(), error.message)))
    }
}

/// An error as `code` NUL `message`.
fn encode(error: &Error) -> Vec<u8> {
    [error.code.as_str().as_bytes(), &[0], error.message.as_bytes()].concat()
}

fn decode(bytes: &[u8]) -> Error {
    let (code, message) = bytes.split_at(bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len()));
    let code = ErrorCode::ALL.into_iter().find(|c| c.as_str().as_bytes() == code).unwrap_or(ErrorCode::Internal);
    Error::new(code, String::from_utf8_lossy(message.get(1..).unwrap_or_default()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_as_code_and_message() {
        for code in ErrorCode::ALL {
            let error = Error::new(code, "step 3: loss is NaN, é");
            let back = decode(&encode(&error));
            assert_eq!((back.code, back.message), (code, error.message));
        }
        assert_eq!(decode(b"E_NOPE\0x").code, ErrorCode::Internal);
    }

    #[test]
    fn alone_the_outcome_is_returned_as_it_is() {
        let group = Group::single();
        assert_eq!(group.agree_sum(Ok([1.5, 2.0]), "w").unwrap(), [1.5, 2.0]);
        assert_eq!(group.agree(Ok("x"), "w").unwrap(), "x");
        let e = group.agree::<()>(Err(Error::new(ErrorCode::NonFiniteLoss, "nan")), "w").unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (ErrorCode::NonFiniteLoss, "nan"));
    }
}
