//! The one seam between the controller's rules and its database: a connection to SQLite or to
//! PostgreSQL with one small API (execute, query, transactions), so that every rule in
//! [`Store`](super::Store) is written once and tested against both.
//!
//! Statements are written with `?1`-style placeholders, in the SQL both databases speak; for
//! PostgreSQL they become `$1`. Values cross the seam as [`Value`]: integers, text, bytes or
//! NULL, converted to whatever type PostgreSQL inferred for the parameter or column.
//!
//! A write transaction ([`Conn::transaction`]) is exclusive: SQLite's `BEGIN IMMEDIATE`, and on
//! PostgreSQL a transaction that first takes one advisory lock shared by every controller. The
//! rules read, decide and write inside it (free addresses, name holders, token uses), so on
//! both databases no two of them interleave, whichever controller runs them.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// The advisory lock every PostgreSQL write transaction takes first ("mesh").
const WRITE_LOCK: i64 = 0x6d65_7368;

/// PostgreSQL's channel for "something changed" (see [`Conn::data_version`]).
pub const CHANGES_CHANNEL: &str = "mesh_changes";

/// A failure of the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("{0}")]
    Sqlite(rusqlite::Error),
    /// PostgreSQL failed, or cannot be reached.
    #[error("{}", pg_message(.0))]
    Postgres(postgres::Error),
    /// A query that must return a row returned none.
    #[error("query returned no rows")]
    NoRows,
    /// A column did not hold what the code reads from it.
    #[error("column {0}: {1}")]
    Type(usize, String),
    /// The database URL asks for something that cannot be set up (its TLS options).
    #[error("{0}")]
    Config(String),
}

// Not `#[from]`: the message already says it all, and as a source it would be said twice.
impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        DbError::Sqlite(e)
    }
}

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> DbError {
        DbError::Postgres(e)
    }
}

fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("PostgreSQL: {}", db.message()),
        // tokio-postgres says what failed ("error connecting to server") and keeps why as
        // the source ("Connection refused", the certificate the TLS check refused).
        None => {
            let mut message = format!("PostgreSQL: {e}");
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                message.push_str(&format!(": {c}"));
                cause = c.source();
            }
            message
        }
    }
}

impl DbError {
    /// A uniqueness (or other) constraint refused the write.
    pub fn is_constraint(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::ConstraintViolation
            }
            DbError::Postgres(e) => e.code().is_some_and(|c| c.code().starts_with("23")),
            _ => false,
        }
    }

    /// Another connection holds the database (SQLite), worth trying again.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    }
}

/// A value crossing the seam.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// What can be a statement's parameter.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_to_value!(i64, i32, u32, u16, u8, usize);

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

/// A statement's parameters: an array of values (`params![a, b]`, `[id]`).
pub trait Params {
    fn values(&self) -> Vec<Value>;
}

impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(&self) -> Vec<Value> {
        self.iter().map(ToValue::to_value).collect()
    }
}

/// Parameters of different types: `params![name, id, now]`.
macro_rules! params {
    () => { [] as [&dyn $crate::store::sql::ToValue; 0] };
    ($($p:expr),+ $(,)?) => { [$(&$p as &dyn $crate::store::sql::ToValue),+] };
}
pub(crate) use params;

/// What can be read from a column.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<i64, String> {
        match v {
            Value::Int(i) => Ok(*i),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<$t, String> {
                let i = i64::from_value(v)?;
                <$t>::try_from(i).map_err(|_| format!("{i} is out of range for {}", stringify!($t)))
            }
        }
    )*};
}
int_from_value!(i32, u32, u16, u8, u64, usize);

impl FromValue for bool {
    fn from_value(v: &Value) -> Result<bool, String> {
        Ok(i64::from_value(v)? != 0)
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<String, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Result<Vec<u8>, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.as_bytes().to_vec()),
            other => Err(format!("expected bytes, found {other:?}")),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Option<T>, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// A column index (only numbers: columns are read by position).
pub trait RowIndex {
    fn index(self) -> usize;
}

impl RowIndex for usize {
    fn index(self) -> usize {
        self
    }
}

/// One row of a result.
#[derive(Debug)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    /// Column `idx`, read as `T`.
    pub fn get<I: RowIndex, T: FromValue>(&self, idx: I) -> Result<T, DbError> {
        let idx = idx.index();
        let v = self
            .values
            .get(idx)
            .ok_or_else(|| DbError::Type(idx, "no such column".into()))?;
        T::from_value(v).map_err(|e| DbError::Type(idx, e))
    }
}

/// `Ok(None)` for a query that returned no row.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>, DbError>;
}

impl<T> OptionalExtension<T> for Result<T, DbError> {
    fn optional(self) -> Result<Option<T>, DbError> {
        match self {
            Ok(t) => Ok(Some(t)),
            Err(DbError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A connection to the controller's database.
pub struct Conn {
    inner: Inner,
    in_tx: Cell<bool>,
}

enum Inner {
    Sqlite(rusqlite::Connection),
    Postgres(Box<RefCell<Pg>>),
}

/// A PostgreSQL connection that comes back by itself: a statement on a closed connection
/// fails, and the next one connects again.
struct Pg {
    /// The connection string as tokio-postgres reads it (see [`super::pg_tls`]).
    url: String,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
    /// Rows changed by this connection.
    changes: u64,
    /// Whether this connection listens on [`CHANGES_CHANNEL`], and what it heard: every
    /// notification, and every reconnection (which may have missed some), counts.
    listening: bool,
    heard: i64,
}

impl Conn {
    /// Wraps an open SQLite connection.
    pub fn sqlite(conn: rusqlite::Connection) -> Conn {
        Conn {
            inner: Inner::Sqlite(conn),
            in_tx: Cell::new(false),
        }
    }

    /// Connects to PostgreSQL at `url` (`postgres://user@host/db`, or key=value pairs).
    /// TLS as the URL's `sslmode` says, with libpq's meanings (see [`super::pg_tls`]).
    pub fn postgres(url: &str) -> Result<Conn, DbError> {
        let target = super::pg_tls::target(url).map_err(DbError::Config)?;
        let mut pg = Pg {
            url: target.url,
            tls: target.tls,
            client: None,
            statements: HashMap::new(),
            changes: 0,
            listening: false,
            heard: 0,
        };
        pg.client()?;
        Ok(Conn {
            inner: Inner::Postgres(Box::new(RefCell::new(pg))),
            in_tx: Cell::new(false),
        })
    }

    /// The SQLite connection underneath, if this is one (backups, migrations, tests).
    pub fn as_sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.inner {
            Inner::Sqlite(c) => Some(c),
            Inner::Postgres(_) => None,
        }
    }

    /// Runs one statement; the number of rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize, DbError> {
        let values = params.values();
        match &self.inner {
            Inner::Sqlite(c) => Ok(c
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(values.iter()))?),
            Inner::Postgres(pg) => {
                let mut pg = pg.borrow_mut();
                let n = pg.run(sql, self.may_retry(), |client, st| {
                    client.execute(st, &pg_params(&values))
                })?;
                pg.changes += n;
                Ok(n as usize)
            }
        }
    }

    /// Runs several statements without parameters.
    pub fn execute_batch(&self, sql: &str) -> Result<(), DbError> {
        match &self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres(pg) => pg.borrow_mut().batch(sql, self.may_retry()),
        }
    }

    /// Whether a statement on a PostgreSQL connection found broken may be repeated on a new
    /// one: outside a transaction, whose earlier statements died with the old connection.
    fn may_retry(&self) -> bool {
        !self.in_tx.get()
    }

    /// Every row of a query.
    pub fn query(&self, sql: &str, params: impl Params) -> Result<Vec<Row>, DbError> {
        let values = params.values();
        match &self.inner {
            Inner::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let columns = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(values.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut values = Vec::with_capacity(columns);
                    for i in 0..columns {
                        values.push(sqlite_value(r.get_ref(i)?));
                    }
                    out.push(Row { values });
                }
                Ok(out)
            }
            Inner::Postgres(pg) => {
                let rows = pg.borrow_mut().run(sql, self.may_retry(), |client, st| {
                    client.query(st, &pg_params(&values))
                })?;
                rows.iter().map(pg_row).collect()
            }
        }
    }

    /// The first row of a query, read by `f`; [`DbError::NoRows`] when there is none.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: impl Params,
        f: impl FnOnce(&Row) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let rows = self.query(sql, params)?;
        f(rows.first().ok_or(DbError::NoRows)?)
    }

    /// A statement to run with [`Stmt::query_map`] or [`Stmt::exists`].
    pub fn prepare(&self, sql: &str) -> Result<Stmt<'_>, DbError> {
        Ok(Stmt {
            conn: self,
            sql: sql.to_owned(),
        })
    }

    /// Same as [`Conn::prepare`] (statements are cached underneath either way).
    pub fn prepare_cached(&self, sql: &str) -> Result<Stmt<'_>, DbError> {
        self.prepare(sql)
    }

    /// Starts an exclusive write transaction (see the module's documentation); it rolls back
    /// unless committed.
    pub fn transaction(&self) -> Result<Tx<'_>, DbError> {
        if self.in_tx.get() {
            return Err(DbError::Type(0, "a transaction is already open".into()));
        }
        match &self.inner {
            Inner::Sqlite(c) => c.execute_batch("BEGIN IMMEDIATE")?,
            Inner::Postgres(pg) => pg.borrow_mut().batch(
                &format!("BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK})"),
                true,
            )?,
        }
        self.in_tx.set(true);
        Ok(Tx {
            conn: self,
            done: false,
        })
    }

    /// Rows changed through this connection since it opened.
    pub fn total_changes(&self) -> u64 {
        match &self.inner {
            Inner::Sqlite(c) => c.total_changes(),
            Inner::Postgres(pg) => pg.borrow().changes,
        }
    }

    /// A number that changes whenever another connection commits a change: SQLite's
    /// `data_version`; on PostgreSQL, what this connection heard on [`CHANGES_CHANNEL`]
    /// (every table's triggers notify there, at commit), counting a reconnection as a change.
    pub fn data_version(&self) -> Result<i64, DbError> {
        match &self.inner {
            Inner::Sqlite(c) => Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?),
            Inner::Postgres(pg) => pg.borrow_mut().heard(),
        }
    }
}

/// An open write transaction; derefs to its connection.
pub struct Tx<'c> {
    conn: &'c Conn,
    done: bool,
}

impl Tx<'_> {
    /// Makes the transaction's writes durable and visible. When the commit fails, the
    /// transaction is rolled back (as on drop): SQLite leaves a transaction whose COMMIT
    /// failed open, and the connection could start no other.
    pub fn commit(mut self) -> Result<(), DbError> {
        let r = self.conn.execute_batch("COMMIT");
        if r.is_ok() {
            self.done = true;
            self.conn.in_tx.set(false);
        }
        r
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.conn.in_tx.set(false);
        }
    }
}

/// A prepared statement (its text; the connection caches the real one).
pub struct Stmt<'c> {
    conn: &'c Conn,
    sql: String,
}

impl Stmt<'_> {
    /// Every row, each read by `f`.
    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<T, DbError>,
    ) -> Result<std::vec::IntoIter<Result<T, DbError>>, DbError> {
        let rows = self.conn.query(&self.sql, params)?;
        Ok(rows.iter().map(&mut f).collect::<Vec<_>>().into_iter())
    }

    /// Whether the query returns any row.
    pub fn exists(&mut self, params: impl Params) -> Result<bool, DbError> {
        Ok(!self.conn.query(&self.sql, params)?.is_empty())
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        // No column of the schema holds a real; a stray one reads as an integer.
        ValueRef::Real(f) => Value::Int(f as i64),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl Pg {
    fn client(&mut self) -> Result<&mut postgres::Client, DbError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut client = postgres::Client::connect(&self.url, self.tls.clone())?;
            // The server's notices ("already exists, skipping") are no news to the log.
            client.batch_execute("SET client_min_messages TO warning")?;
            self.statements.clear();
            if self.listening {
                client.batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))?;
                // Whatever changed while it was away is news.
                self.heard += 1;
            }
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// Prepares `sql` (once per connection) and runs `f` with it. A connection found broken
    /// (the server restarted, a failover) is made again and, when `retry` says the statement
    /// may be repeated, it is tried once more: the caller sees the database's answer, not its
    /// restart.
    fn run<T>(
        &mut self,
        sql: &str,
        retry: bool,
        f: impl Fn(&mut postgres::Client, &postgres::Statement) -> Result<T, postgres::Error>,
    ) -> Result<T, DbError> {
        let first = self.run_once(sql, &f);
        if first.is_err() && self.broken() && retry {
            return self.run_once(sql, &f);
        }
        first
    }

    fn run_once<T>(
        &mut self,
        sql: &str,
        f: &impl Fn(&mut postgres::Client, &postgres::Statement) -> Result<T, postgres::Error>,
    ) -> Result<T, DbError> {
        self.client()?;
        let client = self.client.as_mut().expect("connected above");
        let st = match self.statements.get(sql) {
            Some(st) => st.clone(),
            None => {
                let st = client.prepare(&dollar_placeholders(sql))?;
                self.statements.insert(sql.to_owned(), st.clone());
                st
            }
        };
        Ok(f(client, &st)?)
    }

    /// Whether the last failure was a broken connection (then dropped: the next statement
    /// connects again).
    fn broken(&mut self) -> bool {
        let closed = self.client.as_ref().is_some_and(|c| c.is_closed());
        if closed {
            self.client = None;
        }
        closed
    }

    fn batch(&mut self, sql: &str, retry: bool) -> Result<(), DbError> {
        let mut r = self.client().and_then(|c| Ok(c.batch_execute(sql)?));
        if r.is_err() && self.broken() && retry {
            r = self.client().and_then(|c| Ok(c.batch_execute(sql)?));
        }
        r
    }

    fn heard(&mut self) -> Result<i64, DbError> {
        if !self.listening {
            self.listening = true;
            self.client()?
                .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))?;
        }
        use postgres::fallible_iterator::FallibleIterator;
        // A moment's wait, not `iter()`: the client's runtime reads the socket only while it
        // blocks, so a non-blocking look finds only what an earlier query happened to read.
        let heard = self
            .client()?
            .notifications()
            .timeout_iter(std::time::Duration::from_millis(2))
            .count();
        match heard {
            Ok(n) => self.heard += n as i64,
            // The connection broke: connect again at once (which counts as a change), or say
            // why that fails.
            Err(_) => {
                self.client = None;
                self.client()?;
            }
        }
        Ok(self.heard)
    }
}

/// `?1` placeholders as PostgreSQL's `$1` (outside quoted text).
fn dollar_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c == '?' && !quoted && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

fn pg_params(values: &[Value]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

fn pg_row(row: &postgres::Row) -> Result<Row, DbError> {
    use postgres::types::Type;
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let v = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            row.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else {
            return Err(DbError::Type(
                i,
                format!("a {ty} column, which the controller does not read"),
            ));
        };
        values.push(v.unwrap_or(Value::Null));
    }
    Ok(Row { values })
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().as_str().to_sql(ty, out),
                _ => Err(format!("an integer cannot go in a {ty} parameter").into()),
            },
            Value::Text(s) => match *ty {
                Type::INT8 => s.parse::<i64>()?.to_sql(ty, out),
                Type::INT4 => s.parse::<i32>()?.to_sql(ty, out),
                Type::BYTEA => s.as_bytes().to_sql(ty, out),
                _ => s.as_str().to_sql(ty, out),
            },
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A COMMIT that fails (here a deferred foreign key) leaves no transaction open: the
    /// connection's next transaction starts, and the failed one's write is gone.
    #[test]
    fn a_failed_commit_rolls_back() {
        let conn = Conn::sqlite(rusqlite::Connection::open_in_memory().unwrap());
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE a (id INTEGER PRIMARY KEY);
             CREATE TABLE b (a_id INTEGER REFERENCES a(id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO b (a_id) VALUES (?1)", [7]).unwrap();
        assert!(
            tx.commit().is_err(),
            "the dangling reference fails the commit"
        );
        let tx = conn.transaction().unwrap();
        let n: i64 = tx
            .query_row("SELECT COUNT(*) FROM b", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        tx.commit().unwrap();
    }

    #[test]
    fn placeholders_become_dollars_outside_quotes() {
        assert_eq!(
            dollar_placeholders("SELECT '?1' FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?1' FROM t WHERE a = $1 AND b = $12"
        );
    }
}
