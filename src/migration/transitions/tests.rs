//! Every (state, operation) pair of the transition table.

use super::*;

/// The table of the module documentation, read from the source: the expectations the
/// code is held to, and the documentation kept true by the same test.
fn documented() -> Vec<(State, Vec<String>)> {
    let src = include_str!("../transitions.rs");
    let rows: Vec<Vec<String>> = src
        .lines()
        .filter_map(|l| l.strip_prefix("//! |"))
        .map(|l| {
            l.trim_end_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    let header = &rows[0];
    let ops: Vec<&str> = header[1..].iter().map(String::as_str).collect();
    assert_eq!(ops, Op::ALL.map(op_name), "documented operations");
    rows[2..]
        .iter()
        .map(|r| {
            let s = state_named(&r[0]);
            (s, r[1..].to_vec())
        })
        .collect()
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Prepare => "prepare",
        Op::ResumePrepare => "resume-prepare",
        Op::TrialStart => "trial-start",
        Op::Fallback => "fallback",
        Op::Confirm => "confirm",
        Op::Commit => "commit",
        Op::ForceCommit => "force-commit",
        Op::CommitDone => "commit-done",
        Op::Rollback => "rollback",
        Op::RollbackDone => "rollback-done",
        Op::Hydrate => "hydrate",
        Op::Serve => "serve",
        Op::Status => "status",
    }
}

/// The state whose name starts with `abbrev` (the table abbreviates `rolling-back`).
fn state_named(abbrev: &str) -> State {
    let found: Vec<State> = STATES
        .into_iter()
        .filter(|s| s.name() == abbrev || (abbrev.len() > 8 && s.name().starts_with(abbrev)))
        .collect();
    assert_eq!(found.len(), 1, "state {abbrev:?}");
    found[0]
}

/// A table cell: `None` for a conflict.
fn cell(c: &str) -> Option<Next> {
    Some(match c {
        "✗" => return None,
        "resume" => Next::Resume,
        "finish" => Next::Finish,
        "stay" => Next::Stay,
        "already" => Next::Already,
        other => Next::Enter(state_named(
            other
                .strip_prefix('→')
                .unwrap_or_else(|| panic!("cell {other:?}")),
        )),
    })
}

#[test]
fn the_documented_table_is_the_code_for_every_pair() {
    let doc = documented();
    assert_eq!(
        doc.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        STATES.to_vec(),
        "one row per state, in order"
    );
    let mut pairs = 0;
    for (state, cells) in &doc {
        assert_eq!(cells.len(), Op::ALL.len(), "row {state}");
        for (op, c) in Op::ALL.into_iter().zip(cells) {
            let got = transition(*state, op);
            match cell(c) {
                Some(next) => assert_eq!(got, Ok(next), "({state}, {op:?})"),
                None => {
                    let e = got.expect_err(&format!("({state}, {op:?}) must conflict"));
                    assert_eq!((e.state, e.op), (*state, op));
                }
            }
            pairs += 1;
        }
    }
    assert_eq!(pairs, STATES.len() * Op::ALL.len());
}

/// Every state is listed once (a new state fails to compile here until it is added).
#[test]
fn states_are_complete() {
    for s in STATES {
        let i = match s {
            State::Preparing => 0,
            State::Prepared => 1,
            State::Trial => 2,
            State::Confirmed => 3,
            State::Committing => 4,
            State::Committed => 5,
            State::RollingBack => 6,
            State::RolledBack => 7,
        };
        assert_eq!(STATES[i], s);
    }
    for (i, op) in Op::ALL.into_iter().enumerate() {
        assert!(!Op::ALL[..i].contains(&op), "{op:?} listed twice");
    }
}

#[test]
fn every_conflict_is_one_line_naming_the_state_and_the_operation() {
    for s in STATES {
        for op in Op::ALL {
            let Err(e) = transition(s, op) else { continue };
            let m = e.to_string();
            assert!(!m.contains('\n'), "{m}");
            assert!(m.contains(&format!("state {s}")), "{m}");
            assert!(m.starts_with(&format!("cannot {}", op.verb())), "{m}");
        }
    }
}

#[test]
fn the_messages_operators_rely_on() {
    let msg = |s, op| transition(s, op).unwrap_err().to_string();
    assert_eq!(
        msg(State::Trial, Op::Commit),
        "cannot commit in state trial, not confirmed: confirm the target first, or commit --force"
    );
    assert!(msg(State::Confirmed, Op::Prepare).contains("already prepared (state confirmed)"));
    assert!(msg(State::Committed, Op::Rollback).starts_with("cannot roll back in state committed"));
    assert!(msg(State::Preparing, Op::Hydrate).contains("prepare was interrupted"));
    assert!(msg(State::RolledBack, Op::Commit).contains("a rollback was started"));
    assert!(msg(State::Committing, Op::Confirm).contains("run commit to finish it"));
}

/// The table agrees with the format's own predicates and with relocate/engine.
#[test]
fn the_table_agrees_with_the_state_predicates() {
    for s in STATES {
        // Rollback is refused exactly where the source is gone (relocate::rollback).
        let rb = transition(s, Op::Rollback).is_ok();
        assert_eq!(rb, s.source_recoverable() || s == State::RolledBack, "{s}");
        // Hydrate and a device start need the target presented (Engine::new).
        assert_eq!(transition(s, Op::Hydrate).is_ok(), s.serves_target(), "{s}");
        let start = transition(s, Op::TrialStart).is_ok();
        assert_eq!(start, s.serves_target(), "{s}");
        // Serve refuses only an interrupted prepare.
        assert_eq!(
            transition(s, Op::Serve).is_err(),
            s == State::Preparing,
            "{s}"
        );
    }
}

/// Once commit entered `committing`, no operation leads back to the source; every
/// entered state allows status and what finishes it.
#[test]
fn entered_states_are_consistent() {
    for s in STATES {
        for op in Op::ALL {
            let Ok(Next::Enter(n)) = transition(s, op) else {
                continue;
            };
            assert!(transition(n, Op::Status).is_ok());
            if matches!(op, Op::Commit | Op::ForceCommit | Op::CommitDone) {
                assert!(transition(n, Op::Rollback).is_err(), "{s} {op:?} → {n}");
                assert!(transition(n, Op::Commit).is_ok(), "{s} {op:?} → {n}");
            }
            if matches!(op, Op::Rollback | Op::Fallback | Op::RollbackDone) {
                assert!(transition(n, Op::Rollback).is_ok(), "{s} {op:?} → {n}");
                assert!(transition(n, Op::Confirm).is_err(), "{s} {op:?} → {n}");
                assert!(transition(n, Op::Commit).is_err(), "{s} {op:?} → {n}");
            }
        }
    }
}

#[test]
fn a_device_start_at_the_limit_falls_back_only_in_trial() {
    assert_eq!(
        device_start(State::Prepared, 0, 2),
        (Op::TrialStart, Ok(Next::Enter(State::Trial)))
    );
    assert_eq!(
        device_start(State::Trial, 1, 2),
        (Op::TrialStart, Ok(Next::Enter(State::Trial)))
    );
    assert_eq!(
        device_start(State::Trial, 2, 2),
        (Op::Fallback, Ok(Next::Enter(State::RollingBack)))
    );
    // A confirmed target never falls back, whatever the counter says.
    assert_eq!(
        device_start(State::Confirmed, 9, 2),
        (Op::TrialStart, Ok(Next::Stay))
    );
    for s in STATES {
        for n in [0u8, 1, 2, 3, 255] {
            let (op, r) = device_start(s, n, 2);
            assert_eq!(r, transition(s, op));
        }
    }
}
