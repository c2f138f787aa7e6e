//! `tidemark seed`: sample items written straight into an embedded table of
//! a local `tidemark dev` (its `--data-dir`), so that every operation can be
//! tried on `sqlite:` stores alone, with no cloud store and no other tool.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use tidemark_client::StoreSpec;
use tidemark_connectors::sqlite::EmbeddedStore;
use tidemark_connectors::{AttrValue, Item, KeySchema};
use tidemark_proto::common::v1::data_store::Store;

use crate::error::{CliError, report};
use crate::output::Output;

/// Items per transaction.
const BATCH: usize = 1000;

#[derive(clap::Args, Debug)]
pub struct SeedArgs {
    /// The embedded table: sqlite:TABLE?key=PK[,SK][&db=NAME].
    table: StoreSpec,
    /// How many items (keys item-000001 …; an existing item of the same key
    /// is replaced).
    #[arg(long, default_value_t = 1000)]
    items: u32,
    /// Items are spread over this many groups (`group` = g0, g1, …): the
    /// units of a `migrate-units --unit-attribute group`.
    #[arg(long, default_value_t = 4)]
    groups: u32,
    /// The data directory of the `tidemark dev` that will read the table.
    #[arg(long, default_value = "./.tidemark")]
    data_dir: PathBuf,
}

/// Runs `tidemark seed` (no service is called).
pub async fn run(args: &SeedArgs, out: Output) -> ExitCode {
    match seed(args).await {
        Ok(file) => {
            out.print(
                &json!({
                    "table": args.table.to_string(),
                    "items": args.items,
                    "groups": args.groups,
                    "file": file.display().to_string(),
                }),
                || {
                    format!(
                        "seeded {} items in {} groups into {} ({})\n",
                        args.items,
                        args.groups,
                        args.table,
                        file.display()
                    )
                },
            );
            ExitCode::SUCCESS
        }
        Err(e) => report(&e, &args.data_dir.display().to_string()),
    }
}

/// The items, written; the database file they went to.
async fn seed(args: &SeedArgs) -> Result<PathBuf, CliError> {
    let Some(Store::SqliteTable(table)) = args.table.to_proto().store else {
        return Err(CliError::invalid(
            format!("{} is not an embedded table", args.table),
            "seed writes only sqlite:TABLE?key=PK[,SK][&db=NAME]; other stores have their own tools",
        ));
    };
    let (partition, sort) = match table.key_attribute_names.as_slice() {
        [pk] => (pk.clone(), None),
        [pk, sk] => (pk.clone(), Some(sk.clone())),
        _ => {
            return Err(CliError::invalid(
                format!("{}: one or two key attributes", args.table),
                "name them with ?key=PK or ?key=PK,SK",
            ));
        }
    };
    if args.groups == 0 {
        return Err(CliError::invalid("--groups must be at least 1", ""));
    }
    let database = if table.database.is_empty() {
        "default"
    } else {
        &table.database
    };
    // Where `tidemark dev` keeps the replicator's and the verifier's tables.
    let file = args.data_dir.join("tables").join(format!("{database}.db"));
    let store = EmbeddedStore::open(&file).map_err(|e| {
        CliError::invalid(
            format!("cannot open {}: {e}", file.display()),
            "--data-dir is the directory `tidemark dev` was started with",
        )
    })?;
    let target = store.table(
        &table.table_name,
        KeySchema::new(partition.clone(), sort.as_deref()),
    );
    let mut items = Vec::with_capacity(BATCH);
    for i in 1..=args.items {
        items.push(sample(i, args.groups, &partition, sort.as_deref()));
        if items.len() == BATCH || i == args.items {
            target
                .put_all(std::mem::take(&mut items))
                .await
                .map_err(|e| CliError::Failed {
                    message: format!("writing to {}: {e}", file.display()),
                    hint: "the items written so far stay; run seed again to finish".to_owned(),
                })?;
        }
    }
    Ok(file)
}

/// Item `i`: a few scalars, a list and a nested map, as real items have.
fn sample(i: u32, groups: u32, partition: &str, sort: Option<&str>) -> Item {
    let group = format!("g{}", i % groups);
    let mut item = Item::new();
    item.insert(partition.to_owned(), AttrValue::s(format!("item-{i:06}")));
    if let Some(sort) = sort {
        item.insert(sort.to_owned(), AttrValue::s("v0"));
    }
    item.insert("group".to_owned(), AttrValue::s(group.clone()));
    item.insert("title".to_owned(), AttrValue::s(format!("Sample item {i}")));
    item.insert("views".to_owned(), AttrValue::n(i64::from(i * 7 % 1000)));
    item.insert(
        "tags".to_owned(),
        AttrValue::L(vec![AttrValue::s("sample"), AttrValue::s(group)]),
    );
    item.insert(
        "meta".to_owned(),
        AttrValue::M(
            [
                ("source".to_owned(), AttrValue::s("tidemark seed")),
                ("rank".to_owned(), AttrValue::n(i64::from(i % 10))),
            ]
            .into(),
        ),
    );
    item
}
