//! The lifecycle's one transition table: for each recorded [`State`] and each
//! [`Op`]eration, the next step ([`Next`]) or a typed [`Conflict`].
//!
//! Every place that changes or checks the migration state asks [`transition`] first: the
//! offline commands ([`super::prepare()`], [`super::confirm()`], ...), the service behind
//! `serve` and its control API, the demo. The state machine: `preparing` → `prepared` →
//! `trial` → `confirmed` → `committing` → `committed` → plain target; any state before
//! `committing` → `rolling-back` → `rolled-back` → plain source.
//!
//! | state \ op   | prepare | resume-prepare | trial-start | fallback   | confirm    | commit     | force-commit | commit-done | rollback   | rollback-done | hydrate | serve  | status |
//! |--------------|---------|----------------|-------------|------------|------------|------------|--------------|-------------|------------|---------------|---------|--------|--------|
//! | preparing    | resume  | →prepared      | ✗           | ✗          | ✗          | ✗          | ✗            | ✗           | →rolling-b | ✗             | ✗       | ✗      | stay   |
//! | prepared     | ✗       | ✗              | →trial      | ✗          | →confirmed | ✗          | →committing  | ✗           | →rolling-b | ✗             | stay    | stay   | stay   |
//! | trial        | ✗       | ✗              | →trial      | →rolling-b | →confirmed | ✗          | →committing  | ✗           | →rolling-b | ✗             | stay    | stay   | stay   |
//! | confirmed    | ✗       | ✗              | stay        | ✗          | already    | →committing| →committing  | ✗           | →rolling-b | ✗             | stay    | stay   | stay   |
//! | committing   | ✗       | ✗              | stay        | ✗          | ✗          | resume     | resume       | →committed  | ✗          | ✗             | stay    | resume | stay   |
//! | committed    | ✗       | ✗              | ✗           | ✗          | ✗          | finish     | finish       | already     | ✗          | ✗             | ✗       | finish | stay   |
//! | rolling-back | ✗       | ✗              | ✗           | ✗          | ✗          | ✗          | ✗            | ✗           | resume     | →rolled-back  | ✗       | resume | stay   |
//! | rolled-back  | ✗       | ✗              | ✗           | ✗          | ✗          | ✗          | ✗            | ✗           | finish     | already       | ✗       | finish | stay   |
//!
//! (`→x`: [`Next::Enter`]; ✗: a [`Conflict`]; the unit tests hold this table verbatim.)
//! What the table does not see, and the caller decides: the prepare phase (resume an
//! interrupted prepare, or undo it), the trial start counter (a device start at the limit
//! is a [`Op::Fallback`], see [`device_start`]), whether a VM is connected.

use boot_relocator::State;

/// Every state, in lifecycle order.
pub const STATES: [State; 8] = [
    State::Preparing,
    State::Prepared,
    State::Trial,
    State::Confirmed,
    State::Committing,
    State::Committed,
    State::RollingBack,
    State::RolledBack,
];

/// An operation on the migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `prepare` on a disk that already carries a superblock (a plain disk is prepared
    /// afresh without asking the table).
    Prepare,
    /// The boot chunks of an interrupted prepare are placed: the disk becomes prepared.
    ResumePrepare,
    /// A device start of a fresh guest (a VM boot) while the target is presented.
    TrialStart,
    /// The trial start limit is reached without a confirm: restore the source.
    Fallback,
    /// The operator confirms the target good.
    Confirm,
    /// The operator commits (the target must be confirmed).
    Commit,
    /// The operator commits without a confirm (`commit --force`).
    ForceCommit,
    /// Every target chunk is home: record `committed`.
    CommitDone,
    /// The operator rolls back to the source.
    Rollback,
    /// Every saved source chunk is home: record `rolled-back`.
    RollbackDone,
    /// Download missing target chunks into the released area.
    Hydrate,
    /// `serve` starts on the disk: what it presents.
    Serve,
    /// Report the state.
    Status,
}

impl Op {
    /// Every operation.
    pub const ALL: [Op; 13] = [
        Op::Prepare,
        Op::ResumePrepare,
        Op::TrialStart,
        Op::Fallback,
        Op::Confirm,
        Op::Commit,
        Op::ForceCommit,
        Op::CommitDone,
        Op::Rollback,
        Op::RollbackDone,
        Op::Hydrate,
        Op::Serve,
        Op::Status,
    ];

    /// The operation as a verb ("cannot VERB in state ...").
    pub fn verb(self) -> &'static str {
        match self {
            Op::Prepare => "prepare",
            Op::ResumePrepare => "resume prepare",
            Op::TrialStart => "start a trial of the target",
            Op::Fallback => "fall back",
            Op::Confirm => "confirm",
            Op::Commit | Op::ForceCommit => "commit",
            Op::CommitDone => "finish commit",
            Op::Rollback => "roll back",
            Op::RollbackDone => "finish rollback",
            Op::Hydrate => "hydrate",
            Op::Serve => "serve",
            Op::Status => "show status",
        }
    }
}

/// What an allowed operation does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Record this state, then do the operation's work.
    Enter(State),
    /// The operation the state names was interrupted on this disk: it continues where it
    /// stopped; the state is kept.
    Resume,
    /// Only the last step of the operation the state names is left: removing the
    /// released area (`committed`: the disk becomes the plain target; `rolled-back`: the
    /// plain source).
    Finish,
    /// The operation runs without changing the state.
    Stay,
    /// Already done: nothing to do.
    Already,
}

/// Why an operation is refused in a state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The disk carries streamboot metadata already.
    AlreadyPrepared,
    /// Prepare was interrupted: it must be resumed or rolled back first.
    PrepareInterrupted,
    /// The step was done already or does not belong to this state.
    NotInProgress,
    /// The target is not presented in this state.
    TargetNotServed,
    /// No unconfirmed trial is running (not started yet, or confirmed).
    NoTrial,
    /// The target must be confirmed first.
    NotConfirmed,
    /// Commit started: the source is abandoned.
    CommitStarted,
    /// A rollback started: it must be finished.
    RollbackStarted,
}

/// An operation the current state does not allow. Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Conflict {
    /// The recorded state.
    pub state: State,
    /// The refused operation.
    pub op: Op,
    /// Why.
    pub reason: Reason,
}

impl Conflict {
    /// The one-line message: names the operation and the state, and what to do.
    pub fn message(&self) -> String {
        let (op, s) = (self.op.verb(), self.state);
        match self.reason {
            Reason::AlreadyPrepared => format!(
                "cannot {op}: the disk is already prepared (state {s}); use status, commit or rollback"
            ),
            Reason::PrepareInterrupted => format!(
                "cannot {op} in state {s}: prepare was interrupted; run prepare again to resume it, or rollback"
            ),
            Reason::NotInProgress => {
                format!("cannot {op} in state {s}: that step is not under way")
            }
            Reason::TargetNotServed => {
                format!("cannot {op} in state {s}: the target is not presented in this state")
            }
            Reason::NoTrial => format!(
                "cannot {op} in state {s}: no unconfirmed trial of the target is running"
            ),
            Reason::NotConfirmed => format!(
                "cannot {op} in state {s}, not confirmed: confirm the target first, or commit --force"
            ),
            Reason::CommitStarted => format!(
                "cannot {op} in state {s}: commit started and the source was abandoned; run commit to finish it"
            ),
            Reason::RollbackStarted => format!(
                "cannot {op} in state {s}: a rollback was started; run rollback to finish it"
            ),
        }
    }
}

/// The transition table (see the module documentation).
pub fn transition(state: State, op: Op) -> Result<Next, Conflict> {
    use Next::*;
    use State::*;
    let refuse = |reason| Err(Conflict { state, op, reason });
    // The refusals most operations share outside their own states.
    let common = || match state {
        Preparing => refuse(Reason::PrepareInterrupted),
        Committing | Committed => refuse(Reason::CommitStarted),
        RollingBack | RolledBack => refuse(Reason::RollbackStarted),
        Prepared | Trial | Confirmed => refuse(Reason::NotInProgress),
    };
    match (op, state) {
        (Op::Status, _) => Ok(Stay),

        (Op::Prepare, Preparing) => Ok(Resume),
        (Op::Prepare, _) => refuse(Reason::AlreadyPrepared),
        (Op::ResumePrepare, Preparing) => Ok(Enter(Prepared)),
        (Op::ResumePrepare, _) => refuse(Reason::NotInProgress),

        (Op::TrialStart, Prepared | Trial) => Ok(Enter(Trial)),
        (Op::TrialStart, Confirmed | Committing) => Ok(Stay),
        (Op::TrialStart, Committed | RollingBack | RolledBack) => refuse(Reason::TargetNotServed),
        (Op::TrialStart, Preparing) => common(),

        (Op::Fallback, Trial) => Ok(Enter(RollingBack)),
        (Op::Fallback, Prepared | Confirmed) => refuse(Reason::NoTrial),
        (Op::Fallback, _) => common(),

        (Op::Confirm, Prepared | Trial) => Ok(Enter(Confirmed)),
        (Op::Confirm, Confirmed) => Ok(Already),
        (Op::Confirm, _) => common(),

        (Op::Commit, Prepared | Trial) => refuse(Reason::NotConfirmed),
        (Op::ForceCommit, Prepared | Trial) => Ok(Enter(Committing)),
        (Op::Commit | Op::ForceCommit, Confirmed) => Ok(Enter(Committing)),
        (Op::Commit | Op::ForceCommit, Committing) => Ok(Resume),
        (Op::Commit | Op::ForceCommit, Committed) => Ok(Finish),
        (Op::Commit | Op::ForceCommit, _) => common(),
        (Op::CommitDone, Committing) => Ok(Enter(Committed)),
        (Op::CommitDone, Committed) => Ok(Already),
        (Op::CommitDone, _) => common(),

        (Op::Rollback, Preparing | Prepared | Trial | Confirmed) => Ok(Enter(RollingBack)),
        (Op::Rollback, RollingBack) => Ok(Resume),
        (Op::Rollback, RolledBack) => Ok(Finish),
        (Op::Rollback, _) => common(),
        (Op::RollbackDone, RollingBack) => Ok(Enter(RolledBack)),
        (Op::RollbackDone, RolledBack) => Ok(Already),
        (Op::RollbackDone, Preparing | Prepared | Trial | Confirmed) => {
            refuse(Reason::NotInProgress)
        }
        (Op::RollbackDone, _) => common(),

        (Op::Hydrate, Prepared | Trial | Confirmed | Committing) => Ok(Stay),
        (Op::Hydrate, _) => common(),

        (Op::Serve, Prepared | Trial | Confirmed) => Ok(Stay),
        (Op::Serve, Committing | RollingBack) => Ok(Resume),
        (Op::Serve, Committed | RolledBack) => Ok(Finish),
        (Op::Serve, Preparing) => common(),
    }
}

/// A device start of a fresh guest with `starts` trial starts recorded and `max`
/// allowed: a [`Op::Fallback`] when the limit is reached in `trial` (the guest is
/// resetting, so the contents may switch), else a [`Op::TrialStart`].
pub fn device_start(state: State, starts: u8, max: u8) -> (Op, Result<Next, Conflict>) {
    let op = if state == State::Trial && starts >= max {
        Op::Fallback
    } else {
        Op::TrialStart
    };
    (op, transition(state, op))
}

#[cfg(test)]
mod tests;
