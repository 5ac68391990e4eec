//! The ledger's two stores behind one small interface: SQLite (embedded,
//! the default) and PostgreSQL (several replicas on one database).
//!
//! The ledger's statements are written once, in the SQL both dialects
//! share (`?N` parameters, `ON CONFLICT`, `RETURNING`, sums cast to
//! `BIGINT`); [`Db`] runs them on either store with owned values ([`V`]),
//! so the same two-phase transfers and invariants run on both.

use std::collections::HashMap;

use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::ledger::change::{self, AccountDelta, JobChange, ReputationCounts, TransferRow};
use crate::ledger::error::LedgerError;

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum V {
    Null,
    I(i64),
    F(f64),
    T(String),
    B(Vec<u8>),
}

impl From<i64> for V {
    fn from(v: i64) -> Self {
        V::I(v)
    }
}
impl From<u32> for V {
    fn from(v: u32) -> Self {
        V::I(i64::from(v))
    }
}
impl From<f64> for V {
    fn from(v: f64) -> Self {
        V::F(v)
    }
}
impl From<&str> for V {
    fn from(v: &str) -> Self {
        V::T(v.to_string())
    }
}
impl From<&String> for V {
    fn from(v: &String) -> Self {
        V::T(v.clone())
    }
}
impl From<String> for V {
    fn from(v: String) -> Self {
        V::T(v)
    }
}
impl From<&[u8]> for V {
    fn from(v: &[u8]) -> Self {
        V::B(v.to_vec())
    }
}
impl<T: Into<V>> From<Option<T>> for V {
    fn from(v: Option<T>) -> Self {
        v.map_or(V::Null, Into::into)
    }
}

/// Builds a parameter list: `p![a, b]`.
#[macro_export]
macro_rules! p {
    ($($x:expr),* $(,)?) => { &[$($crate::db::V::from($x)),*][..] };
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<V>);

fn wrong(i: usize, want: &str, got: &V) -> LedgerError {
    LedgerError::Storage(format!("column {i}: expected {want}, found {got:?}"))
}

impl Row {
    fn at(&self, i: usize) -> Result<&V, LedgerError> {
        self.0
            .get(i)
            .ok_or_else(|| LedgerError::Storage(format!("no column {i}")))
    }
    pub fn i64(&self, i: usize) -> Result<i64, LedgerError> {
        match self.at(i)? {
            V::I(v) => Ok(*v),
            v => Err(wrong(i, "an integer", v)),
        }
    }
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, LedgerError> {
        match self.at(i)? {
            V::Null => Ok(None),
            _ => self.i64(i).map(Some),
        }
    }
    pub fn opt_f64(&self, i: usize) -> Result<Option<f64>, LedgerError> {
        match self.at(i)? {
            V::Null => Ok(None),
            V::F(v) => Ok(Some(*v)),
            V::I(v) => Ok(Some(*v as f64)),
            v => Err(wrong(i, "a number", v)),
        }
    }
    pub fn str(&self, i: usize) -> Result<String, LedgerError> {
        match self.at(i)? {
            V::T(v) => Ok(v.clone()),
            v => Err(wrong(i, "text", v)),
        }
    }
    pub fn opt_str(&self, i: usize) -> Result<Option<String>, LedgerError> {
        match self.at(i)? {
            V::Null => Ok(None),
            _ => self.str(i).map(Some),
        }
    }
    pub fn bytes(&self, i: usize) -> Result<Vec<u8>, LedgerError> {
        match self.at(i)? {
            V::B(v) => Ok(v.clone()),
            v => Err(wrong(i, "bytes", v)),
        }
    }
}

/// A connection (or open transaction) that runs the ledger's statements.
pub trait Db {
    /// Runs a statement; returns the rows it changed.
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, LedgerError>;
    /// Runs a query; returns every row.
    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Row>, LedgerError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, params: &[V]) -> Result<Option<Row>, LedgerError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
    /// Exactly one row.
    fn query_one(&mut self, sql: &str, params: &[V]) -> Result<Row, LedgerError> {
        self.query_opt(sql, params)?
            .ok_or_else(|| LedgerError::Storage("the query returned no row".into()))
    }

    /// Runs a statement whose count nobody reads. A store may send it
    /// later, with the next read (PostgreSQL's writer pipelines them: see
    /// `crate::pg::pipe`); its failure then fails that read or the batch.
    fn write(&mut self, sql: &str, params: &[V]) -> Result<(), LedgerError> {
        self.exec(sql, params).map(|_| ())
    }

    /// The id for a new transfer when the store assigns them itself (the
    /// PostgreSQL writer, under its lock, to save the `RETURNING` round
    /// trip); `None`: the database's own identity.
    fn next_transfer_id(&mut self) -> Option<i64> {
        None
    }

    /// A job's row read ahead for this batch (`Some(None)`: read ahead and
    /// not there); `None`: not read ahead, ask the database. Each is given
    /// out once.
    fn prefetched_job(&mut self, _job_id: &str) -> Option<Option<Row>> {
        None
    }

    /// Adds to an account's sums. A store may gather these over a batch
    /// and write each account once (they add up).
    fn add_to_account(&mut self, id: &str, d: AccountDelta) -> Result<(), LedgerError> {
        change::write_account_delta(self, id, d)
    }
    /// Inserts a transfer whose id `next_transfer_id` gave.
    fn add_transfer(&mut self, t: TransferRow) -> Result<(), LedgerError> {
        change::write_transfer(self, t)
    }
    /// Sets a job's resolution columns.
    fn change_job(&mut self, job_id: &str, c: JobChange) -> Result<(), LedgerError> {
        change::write_job_change(self, job_id, c)
    }
    /// Adds to an account's reputation in one role.
    fn add_reputation(
        &mut self,
        account: &str,
        role: &str,
        c: ReputationCounts,
    ) -> Result<(), LedgerError> {
        change::write_reputation(self, account, role, c)
    }
}

impl<T: Db + ?Sized> Db for &mut T {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, LedgerError> {
        (**self).exec(sql, params)
    }
    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Row>, LedgerError> {
        (**self).query(sql, params)
    }
    fn write(&mut self, sql: &str, params: &[V]) -> Result<(), LedgerError> {
        (**self).write(sql, params)
    }
    fn next_transfer_id(&mut self) -> Option<i64> {
        (**self).next_transfer_id()
    }
    fn prefetched_job(&mut self, job_id: &str) -> Option<Option<Row>> {
        (**self).prefetched_job(job_id)
    }
    fn add_to_account(&mut self, id: &str, d: AccountDelta) -> Result<(), LedgerError> {
        (**self).add_to_account(id, d)
    }
    fn add_transfer(&mut self, t: TransferRow) -> Result<(), LedgerError> {
        (**self).add_transfer(t)
    }
    fn change_job(&mut self, job_id: &str, c: JobChange) -> Result<(), LedgerError> {
        (**self).change_job(job_id, c)
    }
    fn add_reputation(
        &mut self,
        account: &str,
        role: &str,
        c: ReputationCounts,
    ) -> Result<(), LedgerError> {
        (**self).add_reputation(account, role, c)
    }
}

// ---------------------------------------------------------------------------
// SQLite

impl rusqlite::ToSql for V {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            V::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            V::I(v) => ToSqlOutput::Borrowed(ValueRef::Integer(*v)),
            V::F(v) => ToSqlOutput::Borrowed(ValueRef::Real(*v)),
            V::T(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
            V::B(v) => ToSqlOutput::Borrowed(ValueRef::Blob(v)),
        })
    }
}

/// A SQLite connection (or a transaction or savepoint on it).
pub struct Lite<'a>(pub &'a rusqlite::Connection);

impl Db for Lite<'_> {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, LedgerError> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Row>, LedgerError> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let cols = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(cols);
            for i in 0..cols {
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => V::Null,
                    ValueRef::Integer(v) => V::I(v),
                    ValueRef::Real(v) => V::F(v),
                    ValueRef::Text(v) => V::T(String::from_utf8_lossy(v).into_owned()),
                    ValueRef::Blob(v) => V::B(v.to_vec()),
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// PostgreSQL

impl ToSql for V {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            V::Null => Ok(IsNull::Yes),
            V::I(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => v.to_string().to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            V::F(v) => v.to_sql(ty, out),
            V::T(v) => v.to_sql(ty, out),
            V::B(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn pg_err(e: postgres::Error) -> LedgerError {
    LedgerError::Storage(match e.as_db_error() {
        Some(d) => format!("postgres: {}: {}", d.code().code(), d.message()),
        None => format!("postgres: {e}"),
    })
}

impl From<postgres::Error> for LedgerError {
    fn from(e: postgres::Error) -> Self {
        pg_err(e)
    }
}

/// `?N` (SQLite) to `$N` (PostgreSQL). The ledger's statements hold no `?`
/// anywhere else.
pub fn to_pg(sql: &str) -> String {
    sql.replace('?', "$")
}

/// Statements prepared once per connection.
#[derive(Default)]
pub struct StatementCache(HashMap<String, postgres::Statement>);

/// A PostgreSQL client or transaction, with its connection's prepared
/// statements.
pub struct Pg<'a, C: postgres::GenericClient> {
    pub client: &'a mut C,
    pub cache: &'a mut StatementCache,
}

impl<C: postgres::GenericClient> Pg<'_, C> {
    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, LedgerError> {
        if let Some(s) = self.cache.0.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&to_pg(sql))?;
        self.cache.0.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

fn pg_params(params: &[V]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl<C: postgres::GenericClient> Db for Pg<'_, C> {
    fn exec(&mut self, sql: &str, params: &[V]) -> Result<u64, LedgerError> {
        let s = self.statement(sql)?;
        Ok(self.client.execute(&s, &pg_params(params))?)
    }

    fn query(&mut self, sql: &str, params: &[V]) -> Result<Vec<Row>, LedgerError> {
        let s = self.statement(sql)?;
        let rows = self.client.query(&s, &pg_params(params))?;
        rows.iter().map(pg_row).collect()
    }
}

pub(crate) fn pg_row(r: &postgres::Row) -> Result<Row, LedgerError> {
    let mut row = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let v = match *c.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(V::I),
            Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(|v| V::I(v.into())),
            Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(|v| V::I(v.into())),
            Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(|v| V::I(v.into())),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(V::F),
            Type::FLOAT4 => r.try_get::<_, Option<f32>>(i)?.map(|v| V::F(v.into())),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(V::B),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                r.try_get::<_, Option<String>>(i)?.map(V::T)
            }
            ref t => {
                return Err(LedgerError::Storage(format!(
                    "column {} has type {t}, which the ledger does not read",
                    c.name()
                )));
            }
        };
        row.push(v.unwrap_or(V::Null));
    }
    Ok(Row(row))
}
