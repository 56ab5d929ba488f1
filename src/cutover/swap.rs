//! The swap: one transaction, under the lock, that gives the incoming table
//! the live name and carries over what hangs off the leaving one.
//!
//! Read from the catalog *before* the renames (definitions name the live
//! table by its live name, which after the renames means the incoming one):
//! dependent views (re-created with `CREATE OR REPLACE VIEW`), foreign keys
//! of other tables that reference it (re-created `NOT VALID`, validated after
//! the commit), grants and owner, the triggers the pipeline asks to carry,
//! and sequences feeding columns (shared, moved, or advanced past the
//! highest value). Everything is one transaction: a failure anywhere rolls
//! all of it back and leaves the leaving table live.

use crate::error::{Error, Result};
use crate::spec::{quote_ident, quote_literal, TableName};
use tokio_postgres::Transaction;

/// Which table leaves the live name, which takes it.
#[derive(Debug, Clone)]
pub struct Names {
    /// The live table now (named `live`).
    pub leaving: TableName,
    /// The name the leaving table gets.
    pub leaving_to: TableName,
    /// The table that takes the live name.
    pub incoming: TableName,
    /// The live name.
    pub live: TableName,
}

/// A foreign key of another table that must follow the live name.
#[derive(Debug, Clone)]
pub struct ForeignKey {
    pub table: String,
    pub name: String,
}

/// The swap's statements, and the foreign keys to validate after commit.
#[derive(Debug, Clone, Default)]
pub struct Swap {
    pub statements: Vec<String>,
    pub to_validate: Vec<ForeignKey>,
    pub notes: Vec<String>,
}

/// Reads the catalog (inside the locked transaction) and builds the swap.
/// `column_pairs` are (leaving column, incoming column) copied one to one.
pub async fn build(
    tx: &Transaction<'_>,
    names: &Names,
    column_pairs: &[(String, String)],
    carry_triggers: &[String],
) -> Result<Swap> {
    let leaving = names.leaving.quoted();
    let incoming = names.incoming.quoted();
    let live = names.live.quoted();
    let mut swap = Swap::default();
    let q = |sql: &'static str| sql;

    // Definitions, read while the leaving table still has the live name.
    let views = tx
        .query(
            q("SELECT DISTINCT v.oid::int8, v.oid::regclass::text, pg_get_viewdef(v.oid) \
               FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class \
               WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass \
                 AND d.refobjid = $1::text::regclass AND v.oid <> $1::text::regclass AND v.relkind = 'v' \
               ORDER BY 1"),
            &[&leaving],
        )
        .await
        .map_err(Error::db("read dependent views"))?;
    let fks = tx
        .query(
            q("SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint \
               WHERE contype = 'f' AND confrelid = $1::text::regclass AND conrelid <> $1::text::regclass ORDER BY oid"),
            &[&leaving],
        )
        .await
        .map_err(Error::db("read referencing foreign keys"))?;
    let grants = tx
        .query(
            q("SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END, \
                      a.privilege_type, a.is_grantable \
               FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = $1::text::regclass"),
            &[&leaving],
        )
        .await
        .map_err(Error::db("read grants"))?;
    let owners = tx
        .query_one(
            q("SELECT pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = $1::text::regclass)), \
                      pg_get_userbyid((SELECT relowner FROM pg_class WHERE oid = $2::text::regclass))"),
            &[&leaving, &incoming],
        )
        .await
        .map_err(Error::db("read owners"))?;
    let mut triggers = Vec::new();
    for t in carry_triggers {
        let def = tx
            .query_opt(
                q("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = $1::text::regclass \
                   AND tgname = $2 AND NOT tgisinternal"),
                &[&leaving, t],
            )
            .await
            .map_err(Error::db("read trigger"))?;
        match def {
            Some(r) => triggers.push((t.clone(), r.get::<_, String>(0))),
            None => swap.notes.push(format!(
                "trigger {t} is not on {}; nothing to carry",
                names.leaving
            )),
        }
    }
    let mut sequences = Vec::new();
    for (from, to) in column_pairs {
        let out = column_sequence(tx, &leaving, from).await?;
        let inc = column_sequence(tx, &incoming, to).await?;
        if let Some(out) = out {
            sequences.push((to.clone(), out, inc));
        }
    }

    // The renames.
    swap.statements.push(format!(
        "ALTER TABLE {leaving} RENAME TO {}",
        quote_ident(&names.leaving_to.name)
    ));
    swap.statements.push(format!(
        "ALTER TABLE {incoming} RENAME TO {}",
        quote_ident(&names.live.name)
    ));
    // From here on, `live` is the incoming table.
    for (to, out, inc) in sequences {
        let col = quote_ident(&to);
        match inc {
            // One shared sequence: it belongs with the live column, so that
            // dropping the other table later cannot take it along.
            Some(inc) if inc.name == out.name => {
                if out.owned && !inc.owned {
                    swap.statements
                        .push(format!("ALTER SEQUENCE {} OWNED BY {live}.{col}", out.name));
                }
            }
            Some(inc) => swap.statements.push(format!(
                "SELECT setval({0}, greatest((SELECT coalesce(max({col})::int8, 1) FROM {live}), \
                 (SELECT last_value FROM {1}), (SELECT last_value FROM {0})))",
                quote_literal(&inc.name),
                inc.name
            )),
            None if out.identity => {
                swap.statements.push(format!(
                    "ALTER TABLE {live} ALTER COLUMN {col} ADD GENERATED BY DEFAULT AS IDENTITY"
                ));
                swap.statements.push(format!(
                    "SELECT setval(pg_get_serial_sequence({0}, {1}), greatest((SELECT coalesce(max({col})::int8, 1) FROM {live}), \
                     (SELECT last_value FROM {2})))",
                    quote_literal(&live),
                    quote_literal(&to),
                    out.name
                ));
            }
            None => {
                swap.statements.push(format!(
                    "ALTER TABLE {live} ALTER COLUMN {col} SET DEFAULT nextval({}::regclass)",
                    quote_literal(&out.name)
                ));
                if out.owned {
                    swap.statements
                        .push(format!("ALTER SEQUENCE {} OWNED BY {live}.{col}", out.name));
                }
            }
        }
    }
    for v in &views {
        let view: String = v.get(1);
        let def: String = v.get(2);
        swap.statements.push(format!(
            "CREATE OR REPLACE VIEW {view} AS {}",
            def.trim_end().trim_end_matches(';')
        ));
    }
    for f in &fks {
        let table: String = f.get(0);
        let name: String = f.get(1);
        let def: String = f.get(2);
        let def = def.trim_end_matches(" NOT VALID");
        swap.statements.push(format!(
            "ALTER TABLE {table} DROP CONSTRAINT {0}, ADD CONSTRAINT {0} {def} NOT VALID",
            quote_ident(&name)
        ));
        swap.to_validate.push(ForeignKey { table, name });
    }
    for g in &grants {
        let grantee: String = g.get(0);
        let privilege: String = g.get(1);
        let grantable: bool = g.get(2);
        swap.statements.push(format!(
            "GRANT {privilege} ON {live} TO {grantee}{}",
            if grantable { " WITH GRANT OPTION" } else { "" }
        ));
    }
    let (owner_out, owner_in): (String, String) = (owners.get(0), owners.get(1));
    if owner_out != owner_in {
        swap.statements.push(format!(
            "ALTER TABLE {live} OWNER TO {}",
            quote_ident(&owner_out)
        ));
    }
    for (name, def) in triggers {
        swap.statements.push(format!(
            "DROP TRIGGER IF EXISTS {} ON {live}",
            quote_ident(&name)
        ));
        swap.statements.push(def);
    }
    Ok(swap)
}

/// A sequence feeding a column: by ownership (serial, identity) or a
/// `nextval(...)` default.
#[derive(Debug, Clone)]
struct Sequence {
    /// Quoted, schema-qualified name.
    name: String,
    identity: bool,
    /// Owned by the column (serial): moves with it.
    owned: bool,
}

async fn column_sequence(
    tx: &Transaction<'_>,
    table: &str,
    column: &str,
) -> Result<Option<Sequence>> {
    let row = tx
        .query_opt(
            "SELECT s.oid::regclass::text, a.attidentity <> '', coalesce(dep.deptype = 'a', false) \
             FROM pg_attribute a \
             LEFT JOIN LATERAL (SELECT d.objid, d.deptype FROM pg_depend d \
                  JOIN pg_class c ON c.oid = d.objid AND c.relkind = 'S' \
                  WHERE d.refobjid = a.attrelid AND d.refobjsubid = a.attnum \
                    AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1) dep ON true \
             LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum \
             JOIN pg_class s ON s.relkind = 'S' AND s.oid = coalesce(dep.objid, \
                  to_regclass(substring(pg_get_expr(ad.adbin, ad.adrelid) from $3))) \
             WHERE a.attrelid = $1::text::regclass AND a.attname = $2",
            &[&table, &column, &r"^nextval\('([^']+)'::regclass\)$"],
        )
        .await
        .map_err(Error::db("read column sequence"))?;
    Ok(row.map(|r| Sequence {
        name: r.get(0),
        identity: r.get(1),
        owned: r.get(2),
    }))
}
