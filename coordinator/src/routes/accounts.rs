//! Accounts: balances and transaction histories.

use super::*;

pub(crate) fn account_param(id: &str, rid: &str) -> Result<String, ApiError> {
    parse_account_id(id)
        .map(|p| p.to_base58())
        .map_err(|e| ApiError::bad_request(e.to_string()).with_request_id(rid))
}

pub(crate) async fn balance(
    State(state): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let rid = request_id(&headers);
    let account = account_param(&id, &rid)?;
    let acc = account.clone();
    let row = state
        .read_with(move |c| crate::admin::balance_of(c, &acc))
        .await
        .map_err(|e| ledger_error(&state, e, &rid))?;
    match row {
        Some(b) => Ok(axum::Json(b).into_response()),
        None => Err(ApiError::not_found(
            ErrorCode::UnknownAccount,
            format!("no account {account}"),
        )
        .with_request_id(&rid)),
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct Page {
    limit: Option<u32>,
    before: Option<i64>,
}

/// `GET /users/{id}/transactions`, signed by the account itself. A read
/// with a good signature by its owner counts against the account's own
/// quota (`account_reads_per_hour`); anything else (a bad or foreign
/// signature, an account that does not exist) counts against the client
/// IP's discovery quota, as an unsigned read would.
pub(crate) async fn transactions(
    State(state): St,
    Path(id): Path<String>,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let (method, uri, headers) = (
        req.method().clone(),
        req.uri().clone(),
        req.headers().clone(),
    );
    let rid = request_id(&headers);
    let ip = client_ip(&state, &req);
    match own_history(&state, &id, page, &method, &uri, &headers, &rid).await {
        Ok(r) => Ok(r),
        Err(Refusal::Plain(e)) => Err(e),
        // Charged to the IP's discovery quota (shared by replicas with
        // PostgreSQL): the quota's 429 when it is spent, else the refusal.
        Err(Refusal::Charged(e)) => {
            Err(check_discovery(&state, &ip, &rid).await.err().unwrap_or(e))
        }
    }
}

/// Why a history read was refused: charged to the client IP's discovery
/// quota or not.
enum Refusal {
    Charged(ApiError),
    Plain(ApiError),
}

async fn own_history(
    state: &Arc<AppState>,
    id: &str,
    page: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &axum::http::HeaderMap,
    rid: &str,
) -> Result<Response, Refusal> {
    let rid = rid.to_string();
    let charge_ip = Refusal::Charged;
    let account = account_param(id, &rid).map_err(charge_ip)?;
    // A history names counterparties, amounts and session ids: only its
    // owner reads it (admins use `troop-coordinator ledger history`).
    let (signer, _) = verify_signed(state, headers, method, uri, b"", &rid)
        .await
        .map_err(charge_ip)?;
    if signer.to_base58() != account {
        security_event(
            state,
            "foreign_history",
            &rid,
            json!({ "account": account, "signer": signer.to_base58() }),
        );
        return Err(charge_ip(
            ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Unauthorized,
                "a transaction history is readable only with its own account's signature",
            )
            .with_request_id(&rid),
        ));
    }
    check_quota(
        state,
        "account_reads",
        &state.account_read_limiter,
        &account,
        state.cfg.account_reads_per_hour,
        &rid,
    )
    .await
    .map_err(Refusal::Plain)?;
    let Query(page) = page
        .map_err(|e| Refusal::Plain(ApiError::bad_request(e.body_text()).with_request_id(&rid)))?;
    let limit = page.limit.unwrap_or(50).clamp(1, 500);
    let before = page.before.unwrap_or(i64::MAX);
    let acc = account.clone();
    let (balance, entries) = state
        .read_with(move |c| {
            let balance = crate::admin::balance_of(c, &acc)?;
            Ok((balance, crate::admin::history(c, &acc, before, limit)?))
        })
        .await
        .map_err(|e| Refusal::Plain(ledger_error(state, e, &rid)))?;
    let Some(balance) = balance else {
        return Err(charge_ip(
            ApiError::not_found(ErrorCode::UnknownAccount, format!("no account {account}"))
                .with_request_id(&rid),
        ));
    };
    let next_before = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e: &TransactionEntry| e.id))
        .flatten();
    Ok(axum::Json(TransactionsResponse {
        account,
        transactions: entries,
        next_before,
        balance: Some(balance),
    })
    .into_response())
}
