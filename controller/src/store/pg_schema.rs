//! The schema on PostgreSQL: the same tables as on SQLite, in PostgreSQL's types, with
//! versioned migrations applied at start, and triggers that tell every controller (on
//! [`CHANGES_CHANNEL`](super::sql::CHANGES_CHANNEL)) when a table changed.
//!
//! Integers are `BIGINT` (the rules read and write 64-bit integers, on SQLite too), text is
//! compared byte by byte (`COLLATE "C"`, SQLite's `BINARY`) whatever the database's locale,
//! so lists sort the same on both.

use super::sql::Conn;
use super::StoreError;

/// Each migration, in order; the schema's version is how many have run. Append, never edit.
const MIGRATIONS: &[&str] = &[
    // 1: the schema of SQLite's version 6.
    r#"
    CREATE TABLE networks (
        id BIGSERIAL PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        network BIGINT NOT NULL,
        prefix_len BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        birthday_budget BIGINT,
        approval TEXT COLLATE "C" NOT NULL DEFAULT 'manual',
        auto_approve_routes TEXT COLLATE "C",
        prefix6 TEXT COLLATE "C"
    );
    CREATE TABLE tokens (
        id TEXT COLLATE "C" PRIMARY KEY,
        network_id BIGINT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
        secret_hash BYTEA NOT NULL,
        reusable BIGINT NOT NULL,
        expires_at BIGINT,
        revoked BIGINT NOT NULL DEFAULT 0,
        uses BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        controller TEXT COLLATE "C",
        controller_tcp TEXT COLLATE "C"
    );
    CREATE TABLE nodes (
        id BIGSERIAL PRIMARY KEY,
        network_id BIGINT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
        key TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        address BIGINT NOT NULL,
        endpoints TEXT COLLATE "C" NOT NULL DEFAULT '[]',
        last_seen BIGINT,
        connected BIGINT NOT NULL DEFAULT 0,
        removed_at BIGINT,
        created_at BIGINT NOT NULL,
        home_relay TEXT COLLATE "C",
        observed TEXT COLLATE "C",
        nat TEXT COLLATE "C",
        approved_by TEXT COLLATE "C",
        approved_at BIGINT,
        address6 TEXT COLLATE "C",
        UNIQUE (network_id, key),
        UNIQUE (network_id, address)
    );
    CREATE UNIQUE INDEX nodes_by_address6 ON nodes (network_id, address6);
    CREATE TABLE relays (
        name TEXT COLLATE "C" PRIMARY KEY,
        addr TEXT COLLATE "C" NOT NULL,
        key TEXT COLLATE "C" NOT NULL,
        created_at BIGINT NOT NULL,
        tcp_addr TEXT COLLATE "C"
    );
    CREATE TABLE join_requests (
        id BIGSERIAL PRIMARY KEY,
        network_id BIGINT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
        key TEXT COLLATE "C" NOT NULL,
        name TEXT COLLATE "C" NOT NULL,
        exact_name BIGINT NOT NULL DEFAULT 0,
        hostname TEXT COLLATE "C" NOT NULL DEFAULT '',
        source TEXT COLLATE "C",
        endpoints TEXT COLLATE "C" NOT NULL DEFAULT '[]',
        observed TEXT COLLATE "C",
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        state TEXT COLLATE "C" NOT NULL DEFAULT 'pending',
        decided_at BIGINT,
        decided_by TEXT COLLATE "C",
        UNIQUE (network_id, key)
    );
    CREATE INDEX join_requests_by_network ON join_requests (network_id, state, first_seen);
    CREATE INDEX join_requests_by_source ON join_requests (network_id, source, state, first_seen);
    CREATE INDEX join_requests_by_age ON join_requests (state, first_seen);
    CREATE INDEX join_requests_by_decision ON join_requests (state, decided_at);
    CREATE TABLE routes (
        id BIGSERIAL PRIMARY KEY,
        network_id BIGINT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
        key TEXT COLLATE "C" NOT NULL,
        prefix TEXT COLLATE "C" NOT NULL,
        state TEXT COLLATE "C" NOT NULL DEFAULT 'pending',
        reason TEXT COLLATE "C",
        advertised_at BIGINT NOT NULL,
        decided_at BIGINT,
        decided_by TEXT COLLATE "C",
        exit BIGINT NOT NULL DEFAULT 0,
        UNIQUE (network_id, key, prefix)
    );
    CREATE INDEX routes_by_network ON routes (network_id, state);
    CREATE TABLE names (
        network_id BIGINT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
        name TEXT COLLATE "C" NOT NULL,
        nodes TEXT COLLATE "C" NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (network_id, name)
    );
    -- Every committed change tells the controllers listening (once per transaction and
    -- table: PostgreSQL folds equal notifications of one transaction).
    CREATE FUNCTION mesh_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('mesh_changes', TG_TABLE_NAME);
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER networks_changed AFTER INSERT OR UPDATE OR DELETE ON networks
        FOR EACH STATEMENT EXECUTE FUNCTION mesh_notify_change();
    CREATE TRIGGER tokens_changed AFTER INSERT OR UPDATE OR DELETE ON tokens
        FOR EACH STATEMENT EXECUTE FUNCTION mesh_notify_change();
    CREATE TRIGGER nodes_changed AFTER INSERT OR UPDATE OR DELETE ON nodes
        FOR EACH STATEMENT EXECUTE FUNCTION mesh_notify_change();
    CREATE TRIGGER relays_changed AFTER INSERT OR UPDATE OR DELETE ON relays
        FOR EACH STATEMENT EXECUTE FUNCTION mesh_notify_change();
    CREATE TRIGGER join_requests_changed AFTER INSERT OR UPDATE OR DELETE ON join_requests
        FOR EACH STATEMENT EXECUTE FUNCTION mesh_notify_change();
    CREATE TRIGGER routes_changed AFTER INSERT OR UPDATE OR DELETE ON routes
        FOR EACH STATEMENT EXECUTE FUNCTION mesh_notify_change();
    CREATE TRIGGER names_changed AFTER INSERT OR UPDATE OR DELETE ON names
        FOR EACH STATEMENT EXECUTE FUNCTION mesh_notify_change();
    "#,
    // 2: several controllers (SQLite's version 7); no triggers on the replicas' rows, which
    // they rewrite every few seconds and which change nothing nodes are told.
    r#"
    CREATE TABLE settings (
        name TEXT COLLATE "C" PRIMARY KEY,
        value TEXT COLLATE "C" NOT NULL
    );
    CREATE TABLE controllers (
        id TEXT COLLATE "C" PRIMARY KEY,
        addrs TEXT COLLATE "C" NOT NULL DEFAULT '[]',
        tcp TEXT COLLATE "C",
        started_at BIGINT NOT NULL,
        last_seen BIGINT NOT NULL
    );
    ALTER TABLE nodes ADD COLUMN session TEXT COLLATE "C";
    "#,
];

/// Brings the schema up to date in one transaction under the controllers' write lock: of
/// several controllers starting at once, one migrates and the others then find nothing to do.
pub(super) fn migrate(conn: &Conn) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS mesh_schema (version BIGINT NOT NULL)")?;
    let version: Option<i64> = tx
        .query("SELECT version FROM mesh_schema", super::sql::params![])?
        .first()
        .map(|r| r.get(0))
        .transpose()?;
    let known = MIGRATIONS.len() as i64;
    let at = version.unwrap_or(0);
    if at > known {
        return Err(StoreError::Invalid(format!(
            "the database has schema version {at}, written by a newer mesh-controller (this one knows {known}); run the newer version on every controller"
        )));
    }
    if at == known {
        return Ok(());
    }
    for step in &MIGRATIONS[at as usize..] {
        tx.execute_batch(step)?;
    }
    if version.is_none() {
        tx.execute("INSERT INTO mesh_schema (version) VALUES (?1)", [known])?;
    } else {
        tx.execute("UPDATE mesh_schema SET version = ?1", [known])?;
    }
    tx.commit()?;
    Ok(())
}
