//! `POST /audits`: a gateway reports an audited answer (issue 25). The
//! coordinator trusts none of it: the worker's and the auditors' signatures
//! and the verdict are checked from the report alone
//! (`AuditReport::judge`), the audited session must be the reporter's own
//! with that worker, and each auditor's request must be a session the
//! reporter bought from that auditor for the same model. A verified report
//! counts in the worker's record (`GET /workers`: `audits`); a confirmed
//! failure refunds the session to the reporter and, at
//! `--suspend-after-failures`, suspends the worker, the report kept whole
//! in the audit log.

use troop_protocol::audit::{AuditReport, Outcome as Verdict};

use super::*;
use troop_protocol::sync::RwLockExt as _;

pub(crate) async fn report_audit(
    State(state): St,
    SignedBytes {
        peer: reporter,
        bytes: body,
        rid,
        ..
    }: SignedBytes,
) -> Result<Response, ApiError> {
    let reporter = reporter.to_base58();
    let report: AuditReport = parse_json(&body).map_err(|e| e.with_request_id(&rid))?;
    let refuse = |why: String| {
        state.audit.record(
            "audit.refused",
            Some(&rid),
            json!({ "reporter": reporter, "worker": report.worker, "job_id": report.job_id, "reason": why }),
        );
        ApiError::bad_request(format!("the audit report proves nothing: {why}"))
            .with_request_id(&rid)
    };
    let verdict = report.judge().map_err(&refuse)?;
    // The sessions behind the signatures: the audited one is the
    // reporter's with the worker; each audit, the reporter's with its
    // auditor, for the same model.
    let mut sessions = vec![(report.job_id.clone(), report.worker.clone())];
    sessions.extend(
        report
            .findings
            .iter()
            .map(|f| (f.job_id.clone(), f.auditor.clone())),
    );
    let jobs = state
        .read_with(move |db| {
            sessions
                .into_iter()
                .map(|(job, who)| Ok((job.clone(), who, crate::ledger::job_parties(db, &job)?)))
                .collect::<Result<Vec<_>, LedgerError>>()
        })
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    for (job, who, parties) in &jobs {
        match parties {
            Some((user, worker, model))
                if *user == reporter && worker == who && *model == report.model => {}
            Some(_) => {
                return Err(refuse(format!(
                    "session {job} is not the reporter's with {who} for {}",
                    report.model
                )));
            }
            None => return Err(refuse(format!("no session {job}"))),
        }
    }
    let failed = verdict == Verdict::Failed;
    let sha = hex::encode(Sha256::digest(&body));
    let outcome = state
        .writer
        .submit(
            Command::RecordAudit {
                reporter: reporter.clone(),
                worker: report.worker.clone(),
                job_id: report.job_id.clone(),
                index: report.index,
                failed,
                report_sha256: sha.clone(),
                suspend_after: state.cfg.suspend_after_failures,
                now_ms: unix_ms(),
            },
            Some(rid.clone()),
        )
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    let Outcome::Audited(done) = outcome else {
        return Err(ApiError::internal("the ledger answered another command").with_request_id(&rid));
    };
    if !done.duplicate {
        let mut fields = json!({
            "worker": report.worker,
            "reporter": reporter,
            "job_id": report.job_id,
            "index": report.index,
            "model": report.model,
            "refunded_milli": done.refunded,
            "report_sha256": sha,
        });
        // A failure keeps its proof: the whole report, signatures and all.
        if failed {
            fields["report"] = serde_json::to_value(&report).unwrap_or_default();
        }
        state.audit.record(
            if failed {
                "audit.failed"
            } else {
                "audit.passed"
            },
            Some(&rid),
            fields,
        );
        metrics::counter!("troop_audit_reports_total", "outcome" => verdict.as_str()).increment(1);
    }
    let newly_suspended = done.suspended
        && state.workers.writing().is_some_and(|mut map| {
            map.get_mut(&report.worker).is_some_and(|w| {
                let first = w.suspended_at.is_none();
                w.suspended_at.get_or_insert(unix_secs());
                first
            })
        });
    if newly_suspended {
        tracing::warn!(worker = %report.worker, failed = done.failed, "worker suspended: confirmed audit failures");
        state.audit.record(
            "worker.suspended",
            Some(&rid),
            json!({ "worker": report.worker, "failed_audits": done.failed, "report_sha256": sha }),
        );
    }
    Ok(axum::Json(json!({
        "outcome": verdict.as_str(),
        "duplicate": done.duplicate,
        "refunded_milli": done.refunded,
        "refunded": credits_from_milli(done.refunded),
        "suspended": done.suspended,
        "audits": { "passed": done.passed, "failed": done.failed },
    }))
    .into_response())
}
