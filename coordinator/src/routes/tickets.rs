//! `/authorize`: a signed user buys a ticket (a reservation in the ledger).

use super::*;

pub(crate) fn new_job_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Whether `w` can sell a ticket for `model` now: its multiplier, or the
/// refusal's audit reason, detail and message.
fn judge_worker(
    w: Option<&WorkerRow>,
    worker: &str,
    model: &str,
    now: u64,
    ttl: u64,
) -> Result<i64, (&'static str, String, String)> {
    match w {
        None => Err((
            "unknown_worker",
            worker.to_string(),
            format!("worker {worker} is not registered"),
        )),
        Some(w) if w.left_at.is_some() => Err((
            "worker_not_alive",
            worker.to_string(),
            format!("worker {worker} has left the mesh"),
        )),
        Some(w) if now.saturating_sub(w.last_seen) > ttl => Err((
            "worker_not_alive",
            worker.to_string(),
            format!(
                "worker {worker} was last seen {} s ago",
                now.saturating_sub(w.last_seen)
            ),
        )),
        Some(w) if w.suspended_at.is_some() => Err((
            "worker_suspended",
            worker.to_string(),
            format!("worker {worker} is suspended: audits of its answers failed (GET /workers)"),
        )),
        Some(w) if !w.models.iter().any(|m| m == model) => Err((
            "model_not_served",
            model.to_string(),
            format!("worker {worker} does not serve {model}"),
        )),
        Some(w) => Ok(w.multiplier_milli),
    }
}

pub(crate) async fn authorize(
    State(state): St,
    SignedBytes {
        peer: user,
        bytes: body,
        rid,
        ip,
        nonce,
        ..
    }: SignedBytes,
) -> Result<Response, ApiError> {
    let user_id = user.to_base58();
    let refuse = |reason: &str, detail: String| {
        state.audit.record(
            "authorize.refused",
            Some(&rid),
            json!({ "user": user_id, "reason": reason, "detail": detail }),
        );
    };
    if state.shared() {
        // PostgreSQL: the nonce and both shared quotas in one round trip.
        let quotas = vec![
            (
                "authorize_ip",
                ip.to_string(),
                state.cfg.authorize_per_ip_per_hour,
            ),
            ("authorize", user_id.clone(), state.cfg.authorize_per_hour),
        ];
        match state.admit(nonce, quotas).await {
            Ok(pg::Admitted::Yes) => {}
            Ok(pg::Admitted::Replay) => {
                return Err(replay_refused(&state, &rid, "/authorize", &user_id));
            }
            Ok(pg::Admitted::Limited { quota, wait_secs }) => {
                let e = if quota == 0 {
                    rate_limited(&state, "authorize_ip", &ip.to_string(), wait_secs, &rid)
                } else {
                    let e = rate_limited(&state, "authorize", &user_id, wait_secs, &rid);
                    refuse("rate_limited", e.message.clone());
                    e
                };
                return Err(e);
            }
            Err(e) => return Err(ledger_error(&state, e, &rid)),
        }
    } else {
        check_quota(
            &state,
            "authorize_ip",
            &state.authorize_ip_limiter,
            &ip,
            state.cfg.authorize_per_ip_per_hour,
            &rid,
        )
        .await?;
        if let Err(e) = check_quota(
            &state,
            "authorize",
            &state.authorize_limiter,
            &user_id,
            state.cfg.authorize_per_hour,
            &rid,
        )
        .await
        {
            refuse("rate_limited", e.message.clone());
            return Err(e);
        }
    }
    let req: AuthorizeRequest = match parse_json(&body) {
        Ok(r) => r,
        Err(e) => {
            refuse("bad_request", e.message.clone());
            return Err(e.with_request_id(&rid));
        }
    };
    if req.model.is_empty() || req.model.len() > 256 {
        refuse("bad_request", "model".into());
        return Err(ApiError::bad_request("model must be 1 to 256 bytes").with_request_id(&rid));
    }
    let worker = match parse_account_id(&req.worker) {
        Ok(w) => w.to_base58(),
        Err(e) => {
            refuse("bad_request", e.to_string());
            return Err(ApiError::bad_request(format!("worker: {e}")).with_request_id(&rid));
        }
    };
    if worker == user_id {
        refuse("bad_request", "self".into());
        return Err(ApiError::bad_request("a user cannot buy from itself").with_request_id(&rid));
    }
    let now = unix_secs();
    let ttl = state.cfg.worker_ttl.as_secs();
    let judged = {
        let map = state
            .workers
            .read()
            .map_err(|_| ApiError::internal("worker table poisoned"))?;
        judge_worker(map.get(&worker), &worker, &req.model, now, ttl)
    };
    // With PostgreSQL this replica's table lags the others by up to a
    // second: a worker that registered (or beat, or changed its models) on
    // another replica just now is read from the database before refusing.
    let judged = match judged {
        Err(_) if state.shared() => {
            let row = state
                .reload_worker(&worker)
                .await
                .map_err(|e| ledger_error(&state, e, &rid))?;
            judge_worker(row.as_ref(), &worker, &req.model, now, ttl)
        }
        j => j,
    };
    let multiplier_milli = match judged {
        Ok(m) => m,
        Err((reason, detail, why)) => {
            refuse(reason, detail);
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                why,
            )
            .with_request_id(&rid));
        }
    };
    let amount = state.cfg.reservation_secs.saturating_mul(multiplier_milli);
    let job_id = new_job_id();
    let exp = now + state.cfg.ticket_ttl.as_secs();
    let out = state
        .writer
        .submit(
            Command::Reserve {
                user: user_id.clone(),
                worker: worker.clone(),
                model: req.model.clone(),
                job_id: job_id.clone(),
                amount,
                multiplier_milli,
                starter_grant: state.cfg.starter_credits_milli,
                grant_policy: GrantPolicy {
                    ip: ip.to_string(),
                    per_ip_per_day: state.cfg.starter_grants_per_ip_per_day,
                    per_hour_milli: state.cfg.starter_milli_per_hour,
                    pow_bits: state.cfg.starter_pow_bits,
                    pow_ok: state.cfg.starter_pow_bits == 0
                        || req.pow.as_deref().is_some_and(|n| {
                            n.len() <= 64
                                && troop_protocol::usage::pow_bits(&user_id, n)
                                    >= state.cfg.starter_pow_bits
                        }),
                },
                expires_at: exp,
                now_ms: unix_ms(),
            },
            Some(rid.clone()),
        )
        .await;
    match out {
        Ok(Outcome::Reserved { granted, .. }) if granted > 0 => {
            metrics::counter!("troop_starter_grants_total", "result" => "granted").increment(1);
            metrics::counter!("troop_starter_credits_granted_total").increment(granted as u64);
            state.audit.record(
                "starter.granted",
                Some(&rid),
                json!({ "user": user_id, "ip": ip.to_string(), "amount_milli": granted }),
            );
        }
        Ok(_) => {}
        Err(e) => {
            if let LedgerError::GrantRefused(reason) = &e {
                metrics::counter!("troop_starter_grants_total", "result" => "refused").increment(1);
                state.audit.record(
                    "starter.refused",
                    Some(&rid),
                    json!({ "user": user_id, "ip": ip.to_string(), "reason": reason }),
                );
                refuse("starter_refused", reason.clone());
            } else if matches!(e, LedgerError::InsufficientFunds { .. }) {
                metrics::counter!("troop_payment_required_total").increment(1);
                refuse("insufficient_credits", e.to_string());
            } else {
                refuse("ledger", e.to_string());
            }
            return Err(ledger_error(&state, e, &rid));
        }
    }
    let claims = TicketClaims {
        iss: TICKET_ISSUER.into(),
        sub: user_id.clone(),
        aud: worker.clone(),
        model: req.model.clone(),
        jti: job_id.clone(),
        iat: now,
        nbf: now,
        exp,
        max_tokens: req.max_tokens,
        reserved_milli: amount,
    };
    let signer = state.clone();
    let signed = tokio::task::spawn_blocking(move || signer.keys.sign(&claims)).await;
    let ticket = match signed {
        Ok(Ok(t)) => t,
        other => {
            tracing::error!(?other, "ticket signing failed");
            let _ = state
                .writer
                .submit(
                    Command::Cancel {
                        job_id: job_id.clone(),
                        now_ms: unix_ms(),
                    },
                    Some(rid.clone()),
                )
                .await;
            refuse("signing_failed", job_id);
            return Err(ApiError::internal("ticket signing failed").with_request_id(&rid));
        }
    };
    metrics::counter!("troop_tickets_issued_total").increment(1);
    state.audit.record(
        "authorize.granted",
        Some(&rid),
        json!({ "user": user_id, "worker": worker, "model": req.model, "job_id": job_id, "reserved_milli": amount, "exp": exp }),
    );
    Ok(axum::Json(AuthorizeResponse {
        ticket,
        job_id,
        worker,
        model: req.model,
        reserved: credits_from_milli(amount),
        expires_at: exp,
        kid: state.keys.kid.clone(),
    })
    .into_response())
}
