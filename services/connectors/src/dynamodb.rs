//! DynamoDB: a [`SourceTable`] over a table and a versioned [`Sink`]. Errors
//! are classified here once: throttling, timeouts and 5xx are retryable,
//! conditional-check failures are preconditions, the rest is terminal.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::operation::create_table::builders::CreateTableFluentBuilder;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue as DdbValue, BillingMode, ConsumedCapacity,
    KeySchemaElement, KeyType, ReturnConsumedCapacity, ReturnValue, ScalarAttributeType,
    StreamSpecification, StreamViewType, TableDescription, TableStatus,
};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::error::{ConnectorError, ConnectorResult};
use crate::predicate::{ExprNames, ExprValues, Predicate};
use crate::retry::{RetryPolicy, retry};
use crate::traits::{
    BucketDigest, RecordOutcome, ScanPage, ScanRequest, Sink, SinkRecord, SourceTable, fold_digest,
};
use crate::value::{AttrValue, Item, Key, KeySchema, Number};

const BACKEND: &str = "dynamodb";

// Where they always were, for the services that build their clients and
// classify their own DynamoDB calls.
pub use crate::aws::{classify, sdk_config};

/// DynamoDB's rule for table names: 3 to 255 characters of `A-Z a-z 0-9 _ . -`.
pub const MAX_TABLE_NAME_CHARS: usize = 255;

/// Checks a caller-given table name before it is sent: DynamoDB refuses a
/// bad one with an error the SDK cannot classify (a 2 MB name answered
/// INTERNAL), and the caller's mistake should read as one.
///
/// # Errors
/// `InvalidInput` saying what is wrong with the name.
pub fn check_table_name(name: &str) -> ConnectorResult<()> {
    let bad = |why: String| {
        // Quote no more than the start of a long name.
        let shown: String = name.chars().take(64).collect();
        let more = if shown.len() < name.len() { "…" } else { "" };
        Err(ConnectorError::invalid(
            BACKEND,
            format!("table name {shown:?}{more}: {why}"),
        ))
    };
    if name.len() < 3 || name.len() > MAX_TABLE_NAME_CHARS {
        return bad(format!(
            "must be 3 to {MAX_TABLE_NAME_CHARS} characters (it has {})",
            name.chars().count()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return bad(format!(
            "{c:?} is not allowed (only A-Z, a-z, 0-9, '_', '.' and '-')"
        ));
    }
    Ok(())
}

/// The table's description, or `NotFound`: also the cheapest probe that
/// DynamoDB answers and the table exists.
///
/// # Errors
/// `InvalidInput` for a name DynamoDB would refuse; `NotFound` when the
/// table does not exist; the classified failure.
pub async fn describe_table(client: &Client, name: &str) -> ConnectorResult<TableDescription> {
    check_table_name(name)?;
    client
        .describe_table()
        .table_name(name)
        .send()
        .await
        .map_err(|e| classify(BACKEND, &e))?
        .table
        .ok_or_else(|| ConnectorError::terminal(BACKEND, "DescribeTable returned no table"))
}

/// Reads the item at `key` consistently, as the SDK returns it.
///
/// # Errors
/// The classified failure.
pub async fn get_item(
    client: &Client,
    table: &str,
    key: HashMap<String, DdbValue>,
) -> ConnectorResult<Option<HashMap<String, DdbValue>>> {
    Ok(client
        .get_item()
        .table_name(table)
        .set_key(Some(key))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| classify(BACKEND, &e))?
        .item)
}

fn create_table_request(
    client: &Client,
    name: &str,
    schema: &KeySchema,
    stream: bool,
) -> ConnectorResult<CreateTableFluentBuilder> {
    check_table_name(name)?;
    let mut request = client
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest);
    for (name, key_type) in std::iter::once((&schema.partition, KeyType::Hash))
        .chain(schema.sort.as_ref().map(|s| (s, KeyType::Range)))
    {
        request = request
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(name)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| ConnectorError::invalid(BACKEND, e.to_string()))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(name)
                    .key_type(key_type)
                    .build()
                    .map_err(|e| ConnectorError::invalid(BACKEND, e.to_string()))?,
            );
    }
    if stream {
        request = request.stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()
                .map_err(|e| ConnectorError::invalid(BACKEND, e.to_string()))?,
        );
    }
    Ok(request)
}

/// Creates an on-demand table with string key attributes (and a
/// NEW_AND_OLD_IMAGES stream when `stream`), without waiting for it. Tables
/// in production come from deploy/cloudformation; this serves tests,
/// benchmarks and local set-up.
///
/// # Errors
/// The classified failure, for example when the table already exists.
pub async fn create_table(
    client: &Client,
    name: &str,
    schema: &KeySchema,
    stream: bool,
) -> ConnectorResult<()> {
    create_table_request(client, name, schema, stream)?
        .send()
        .await
        .map_err(|e| classify(BACKEND, &e))?;
    Ok(())
}

/// Creates the table as [`create_table`] does unless it exists; another
/// process creating it at the same moment counts as existing.
///
/// # Errors
/// When the table can be neither described nor created.
pub async fn ensure_table(client: &Client, name: &str, schema: &KeySchema) -> ConnectorResult<()> {
    match describe_table(client, name).await {
        Ok(_) => return Ok(()),
        Err(ConnectorError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    match create_table_request(client, name, schema, false)?
        .send()
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
        Err(e) => Err(classify(BACKEND, &e)),
    }
}

/// Waits until the table is ACTIVE, a minute at most: a table being created
/// refuses reads and writes.
///
/// # Errors
/// The classified failure of DescribeTable, or a terminal error after a minute.
pub async fn wait_active(client: &Client, name: &str) -> ConnectorResult<()> {
    for _ in 0..600 {
        if describe_table(client, name).await?.table_status == Some(TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(ConnectorError::terminal(
        BACKEND,
        format!("table {name} did not become active"),
    ))
}

/// Conversions between [`AttrValue`] and an SDK's `AttributeValue`; the
/// DynamoDB and DynamoDB Streams SDKs each have their own identical type.
macro_rules! attribute_conversions {
    ($sdk:ty, $to:ident, $from:ident, $blob:path) => {
        pub fn $to(v: &AttrValue) -> $sdk {
            type V = $sdk;
            match v {
                AttrValue::S(s) => V::S(s.clone()),
                AttrValue::N(n) => V::N(n.to_string()),
                AttrValue::B(b) => V::B(<$blob>::new(b.clone())),
                AttrValue::Bool(b) => V::Bool(*b),
                AttrValue::Null(_) => V::Null(true),
                AttrValue::Ss(s) => V::Ss(s.iter().cloned().collect()),
                AttrValue::Ns(s) => V::Ns(s.iter().map(ToString::to_string).collect()),
                AttrValue::Bs(s) => V::Bs(s.iter().map(|b| <$blob>::new(b.clone())).collect()),
                AttrValue::L(l) => V::L(l.iter().map($to).collect()),
                AttrValue::M(m) => V::M(m.iter().map(|(k, v)| (k.clone(), $to(v))).collect()),
            }
        }

        /// # Errors
        /// On a number that is not decimal text or a value type this
        /// version does not know.
        pub fn $from(v: &$sdk) -> Result<AttrValue, String> {
            type V = $sdk;
            Ok(match v {
                V::S(s) => AttrValue::S(s.clone()),
                V::N(n) => AttrValue::N(Number::parse(n)?),
                V::B(b) => AttrValue::B(b.as_ref().to_vec()),
                V::Bool(b) => AttrValue::Bool(*b),
                V::Null(_) => AttrValue::Null(true),
                V::Ss(s) => AttrValue::Ss(s.iter().cloned().collect()),
                V::Ns(s) => AttrValue::Ns(
                    s.iter()
                        .map(|n| Number::parse(n))
                        .collect::<Result<_, _>>()?,
                ),
                V::Bs(s) => AttrValue::Bs(s.iter().map(|b| b.as_ref().to_vec()).collect()),
                V::L(l) => AttrValue::L(l.iter().map($from).collect::<Result<_, _>>()?),
                V::M(m) => AttrValue::M(
                    m.iter()
                        .map(|(k, v)| Ok((k.clone(), $from(v)?)))
                        .collect::<Result<_, String>>()?,
                ),
                other => return Err(format!("unsupported attribute value {other:?}")),
            })
        }
    };
}

attribute_conversions!(
    DdbValue,
    to_ddb,
    from_ddb,
    aws_sdk_dynamodb::primitives::Blob
);
#[cfg(feature = "streams")]
attribute_conversions!(
    aws_sdk_dynamodbstreams::types::AttributeValue,
    to_streams,
    from_streams,
    aws_sdk_dynamodbstreams::primitives::Blob
);

pub fn item_to_ddb(item: &Item) -> HashMap<String, DdbValue> {
    item.iter().map(|(k, v)| (k.clone(), to_ddb(v))).collect()
}

/// # Errors
/// When an attribute cannot be represented.
pub fn item_from_ddb(item: &HashMap<String, DdbValue>) -> ConnectorResult<Item> {
    item.iter()
        .map(|(k, v)| {
            Ok((
                k.clone(),
                from_ddb(v).map_err(|m| ConnectorError::invalid(BACKEND, m))?,
            ))
        })
        .collect()
}

fn key_to_ddb(key: &Key) -> HashMap<String, DdbValue> {
    key.0.iter().map(|(k, v)| (k.clone(), to_ddb(v))).collect()
}

/// A DynamoDB table as a [`SourceTable`].
#[derive(Clone)]
pub struct DynamoTable {
    client: Client,
    name: String,
    schema: KeySchema,
    /// Key attribute → its type (`S`, `N` or `B`).
    key_types: HashMap<String, String>,
    retry: RetryPolicy,
}

impl DynamoTable {
    /// Opens an existing table, reading its key schema.
    ///
    /// # Errors
    /// `InvalidInput` for a name DynamoDB would refuse (see
    /// [`check_table_name`]); `NotFound` when the table does not exist.
    pub async fn open(client: Client, name: &str) -> ConnectorResult<Self> {
        let client = own_retries(&client);
        let table = retry(&TABLE_RETRY, "describe table", || {
            describe_table(&client, name)
        })
        .await?;
        let mut schema = KeySchema::new("", None);
        for element in table.key_schema() {
            match element.key_type {
                KeyType::Hash => schema.partition.clone_from(&element.attribute_name),
                KeyType::Range => schema.sort = Some(element.attribute_name.clone()),
                _ => {}
            }
        }
        let key_types = table
            .attribute_definitions()
            .iter()
            .map(|d| {
                (
                    d.attribute_name.clone(),
                    d.attribute_type.as_str().to_owned(),
                )
            })
            .collect();
        Ok(Self {
            client,
            name: name.to_owned(),
            schema,
            key_types,
            retry: TABLE_RETRY,
        })
    }

    /// The type of a key attribute: `S`, `N` or `B` (`None` for an attribute
    /// that is no key of the table or its indexes).
    pub fn key_type(&self, attribute: &str) -> Option<&str> {
        self.key_types.get(attribute).map(String::as_str)
    }

    /// Creates an on-demand table with string key attributes (and a
    /// NEW_AND_OLD_IMAGES stream when `stream`), waits until it is active,
    /// and opens it. Used by tests, benchmarks and local set-up.
    ///
    /// # Errors
    /// When creation fails or the table does not become active in a minute.
    pub async fn create(
        client: Client,
        name: &str,
        schema: &KeySchema,
        stream: bool,
    ) -> ConnectorResult<Self> {
        create_table(&client, name, schema, stream).await?;
        wait_active(&client, name).await?;
        Self::open(client, name).await
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn condition(
        &self,
        condition: Option<&Predicate>,
        names: &mut ExprNames,
        values: &mut ExprValues,
    ) -> Option<String> {
        condition.map(|c| c.render(&self.schema.partition, names, values))
    }
}

/// A table's retries, the only ones its calls get ([`own_retries`]).
const TABLE_RETRY: RetryPolicy = RetryPolicy::AWS;

/// `client` without the SDK's own retries: a table's calls retry in
/// [`retry`] (full jitter), where each throttled attempt is seen and counted
/// ([`crate::capacity`]) instead of being absorbed by a second retry loop
/// underneath, which would also multiply the attempts. Each attempt is
/// bounded ([`crate::aws::ATTEMPT_TIMEOUT`]).
pub fn own_retries(client: &Client) -> Client {
    let config = client.config();
    Client::from_conf(
        config
            .to_builder()
            .retry_config(RetryConfig::disabled())
            .timeout_config(crate::aws::bounded_attempts(
                config.timeout_config(),
                crate::aws::ATTEMPT_TIMEOUT,
            ))
            .build(),
    )
}

/// `client` with each attempt bounded ([`crate::aws::ATTEMPT_TIMEOUT`]),
/// keeping the SDK's own retries: for a store with no retry loop of its
/// own.
pub fn bounded(client: &Client) -> Client {
    let config = client.config();
    Client::from_conf(
        config
            .to_builder()
            .timeout_config(crate::aws::bounded_attempts(
                config.timeout_config(),
                crate::aws::ATTEMPT_TIMEOUT,
            ))
            .build(),
    )
}

/// Adds what a write consumed to the task's capacity meter.
pub fn record_consumed(consumed: Option<&ConsumedCapacity>) {
    if let Some(units) = consumed.and_then(ConsumedCapacity::capacity_units) {
        crate::capacity::record_consumed(units);
    }
}

fn non_empty<K, V>(map: HashMap<K, V>) -> Option<HashMap<K, V>> {
    (!map.is_empty()).then_some(map)
}

fn values_to_ddb(values: ExprValues) -> Option<HashMap<String, DdbValue>> {
    non_empty(values.0.into_iter().map(|(k, v)| (k, to_ddb(&v))).collect())
}

#[async_trait]
impl SourceTable for DynamoTable {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_schema(&self) -> &KeySchema {
        &self.schema
    }

    #[tracing::instrument(skip_all, fields(table = %self.name, segment = request.segment))]
    async fn scan(&self, request: &ScanRequest) -> ConnectorResult<ScanPage> {
        if request.total_segments == 0 || request.segment >= request.total_segments {
            return Err(ConnectorError::invalid(
                BACKEND,
                "segment must be below total_segments",
            ));
        }
        retry(&self.retry, "scan", || async {
            let mut names = ExprNames::default();
            let mut values = ExprValues::default();
            let filter = self.condition(request.filter.as_ref(), &mut names, &mut values);
            let mut scan = self
                .client
                .scan()
                .table_name(&self.name)
                .limit(i32::try_from(request.limit.max(1)).unwrap_or(i32::MAX))
                .consistent_read(request.consistent)
                .set_filter_expression(filter)
                .set_expression_attribute_names(non_empty(names.0))
                .set_expression_attribute_values(values_to_ddb(values));
            if request.total_segments > 1 {
                scan = scan
                    .segment(i32::try_from(request.segment).unwrap_or(0))
                    .total_segments(i32::try_from(request.total_segments).unwrap_or(1));
            }
            if let Some(start) = &request.start_after {
                scan = scan.set_exclusive_start_key(Some(key_to_ddb(start)));
            }
            let out = scan.send().await.map_err(|e| classify(BACKEND, &e))?;
            Ok(ScanPage {
                items: out
                    .items()
                    .iter()
                    .map(item_from_ddb)
                    .collect::<Result<_, _>>()?,
                last_key: out
                    .last_evaluated_key
                    .as_ref()
                    .map(|k| item_from_ddb(k).map(Key))
                    .transpose()?,
                scanned: u64::try_from(out.scanned_count).unwrap_or(0),
            })
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(table = %self.name))]
    async fn get(&self, key: &Key) -> ConnectorResult<Option<Item>> {
        retry(&self.retry, "get", || async {
            get_item(&self.client, &self.name, key_to_ddb(key))
                .await?
                .as_ref()
                .map(item_from_ddb)
                .transpose()
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(table = %self.name))]
    async fn put(&self, item: &Item, condition: Option<&Predicate>) -> ConnectorResult<()> {
        retry(&self.retry, "put", || async {
            let mut names = ExprNames::default();
            let mut values = ExprValues::default();
            let condition = self.condition(condition, &mut names, &mut values);
            let out = self
                .client
                .put_item()
                .table_name(&self.name)
                .set_item(Some(item_to_ddb(item)))
                .set_condition_expression(condition)
                .set_expression_attribute_names(non_empty(names.0))
                .set_expression_attribute_values(values_to_ddb(values))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| classify(BACKEND, &e))?;
            record_consumed(out.consumed_capacity());
            Ok(())
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(table = %self.name))]
    async fn update(
        &self,
        key: &Key,
        set: &Item,
        condition: Option<&Predicate>,
    ) -> ConnectorResult<Item> {
        if set.is_empty() {
            return Err(ConnectorError::invalid(BACKEND, "update sets no attribute"));
        }
        retry(&self.retry, "update", || async {
            let mut names = ExprNames::default();
            let mut values = ExprValues::default();
            let assignments: Vec<String> = set
                .iter()
                .map(|(attr, value)| format!("{} = {}", names.name(attr), values.value(value)))
                .collect();
            let condition = self.condition(condition, &mut names, &mut values);
            let out = self
                .client
                .update_item()
                .table_name(&self.name)
                .set_key(Some(key_to_ddb(key)))
                .update_expression(format!("SET {}", assignments.join(", ")))
                .set_condition_expression(condition)
                .set_expression_attribute_names(non_empty(names.0))
                .set_expression_attribute_values(values_to_ddb(values))
                .return_values(ReturnValue::AllNew)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| classify(BACKEND, &e))?;
            record_consumed(out.consumed_capacity());
            item_from_ddb(out.attributes.as_ref().unwrap_or(&HashMap::new()))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(table = %self.name))]
    async fn delete(&self, key: &Key, condition: Option<&Predicate>) -> ConnectorResult<()> {
        retry(&self.retry, "delete", || async {
            let mut names = ExprNames::default();
            let mut values = ExprValues::default();
            let condition = self.condition(condition, &mut names, &mut values);
            let out = self
                .client
                .delete_item()
                .table_name(&self.name)
                .set_key(Some(key_to_ddb(key)))
                .set_condition_expression(condition)
                .set_expression_attribute_names(non_empty(names.0))
                .set_expression_attribute_values(values_to_ddb(values))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| classify(BACKEND, &e))?;
            record_consumed(out.consumed_capacity());
            Ok(())
        })
        .await
    }
}

/// Attribute that holds the source version of each item in a DynamoDB sink.
pub const VERSION_ATTRIBUTE: &str = "tidemark_version";
/// Marks a tombstone: the item was deleted at `tidemark_version`.
pub const DELETED_ATTRIBUTE: &str = "tidemark_deleted";
/// Marks a pipeline's write, `<origin>@<version>`, when the sink has an
/// origin: a pipeline copying the other way skips the changes that set it
/// (see `PipelineSpec.skip_origin`).
pub const ORIGIN_ATTRIBUTE: &str = "_tidemark_origin";

/// Writes of a [`DynamoSink`] batch in flight at once, unless told
/// otherwise ([`DynamoSink::with_writes_in_flight`]).
pub const DEFAULT_WRITES_IN_FLIGHT: usize = 16;

/// A DynamoDB table as a versioned [`Sink`]: every write is a PutItem
/// conditional on the stored version being lower; deletes leave a tombstone
/// item so an older upsert cannot resurrect the item.
#[derive(Clone)]
pub struct DynamoSink {
    table: DynamoTable,
    /// Writes of a batch in flight at once.
    concurrency: usize,
    origin: Option<String>,
    /// Where each item's version is kept ([`VERSION_ATTRIBUTE`] unless
    /// told otherwise).
    version_attribute: String,
}

impl DynamoSink {
    pub fn new(table: DynamoTable) -> Self {
        Self {
            table,
            concurrency: DEFAULT_WRITES_IN_FLIGHT,
            origin: None,
            version_attribute: VERSION_ATTRIBUTE.to_owned(),
        }
    }

    /// Keeps each item's version in `name` instead of [`VERSION_ATTRIBUTE`]
    /// (a table whose own writers use that name: the reverse pipeline of a
    /// cut-over writes `_tidemark_version` into the old table). Empty: the
    /// default.
    #[must_use]
    pub fn with_version_attribute(mut self, name: &str) -> Self {
        if !name.is_empty() {
            name.clone_into(&mut self.version_attribute);
        }
        self
    }

    /// Applies a batch's records `n` at a time (0: the default,
    /// [`DEFAULT_WRITES_IN_FLIGHT`]).
    #[must_use]
    pub fn with_writes_in_flight(mut self, n: usize) -> Self {
        self.concurrency = if n == 0 { DEFAULT_WRITES_IN_FLIGHT } else { n };
        self
    }

    /// Marks every write with [`ORIGIN_ATTRIBUTE`] `<origin>@<version>`.
    #[must_use]
    pub fn with_origin(mut self, origin: &str) -> Self {
        self.origin = Some(origin.to_owned());
        self
    }

    async fn apply_one(&self, record: &SinkRecord) -> ConnectorResult<RecordOutcome> {
        let mut item = match record.op.item() {
            Some(item) => {
                // An item may carry the version itself (Tidemark's own
                // writers keep it in `tidemark_version`); any other value
                // there, or a tombstone marker, would be lost or misread.
                let own_version = item
                    .get(&self.version_attribute)
                    .map(|v| v.as_number().and_then(Number::as_u64));
                if item.contains_key(DELETED_ATTRIBUTE)
                    || own_version.is_some_and(|v| v != Some(record.version))
                {
                    return Ok(RecordOutcome::Rejected(format!(
                        "item uses the reserved attribute {DELETED_ATTRIBUTE}, or {} other than the record's version {}",
                        self.version_attribute, record.version
                    )));
                }
                item.into_owned()
            }
            None => {
                let mut tombstone = record.key.0.clone();
                tombstone.insert(DELETED_ATTRIBUTE.to_owned(), AttrValue::Bool(true));
                tombstone
            }
        };
        item.extend(record.key.0.clone());
        item.insert(self.version_attribute.clone(), AttrValue::n(record.version));
        match &self.origin {
            Some(origin) => {
                item.insert(
                    ORIGIN_ATTRIBUTE.to_owned(),
                    AttrValue::s(format!("{origin}@{}", record.version)),
                );
            }
            // An upsert never carries someone else's marker into a target
            // that is not marked itself.
            None => {
                item.remove(ORIGIN_ATTRIBUTE);
            }
        }
        let condition = Predicate::version_below(&self.version_attribute, record.version);
        match self.table.put(&item, Some(&condition)).await {
            Ok(()) => Ok(RecordOutcome::Applied),
            Err(ConnectorError::Precondition(_)) => Ok(RecordOutcome::Stale),
            Err(ConnectorError::InvalidInput { message, .. }) => {
                Ok(RecordOutcome::Rejected(message))
            }
            Err(e) => Err(e),
        }
    }
}

fn strip_reserved(version_attribute: &str, mut item: Item) -> Option<(u64, Item)> {
    let version = item
        .remove(version_attribute)
        .and_then(|v| v.as_number().and_then(Number::as_u64))
        .unwrap_or(0);
    item.remove(ORIGIN_ATTRIBUTE);
    if item.remove(DELETED_ATTRIBUTE).is_some() {
        return None;
    }
    Some((version, item))
}

#[async_trait]
impl Sink for DynamoSink {
    fn name(&self) -> String {
        format!("dynamodb:{}", self.table.name)
    }

    #[tracing::instrument(skip_all, fields(sink = %self.table.name, records = batch.len()))]
    async fn apply(&self, batch: &[SinkRecord]) -> ConnectorResult<Vec<RecordOutcome>> {
        // Futures collected first: a closure in `map` trips the async-trait
        // lifetime inference.
        let writes: Vec<_> = batch.iter().map(|record| self.apply_one(record)).collect();
        crate::traits::apply_in_order(writes, self.concurrency).await
    }

    async fn read(&self, key: &Key) -> ConnectorResult<Option<(u64, Item)>> {
        Ok(self
            .table
            .get(key)
            .await?
            .and_then(|item| strip_reserved(&self.version_attribute, item)))
    }

    async fn purge(&self, keys: &[Key]) -> ConnectorResult<u64> {
        let exists = Predicate::ItemExists;
        let deletes: Vec<_> = keys
            .iter()
            .map(|key| async {
                match self.table.delete(key, Some(&exists)).await {
                    Ok(()) => Ok(RecordOutcome::Applied),
                    Err(ConnectorError::Precondition(_)) => Ok(RecordOutcome::Stale),
                    Err(e) => Err(e),
                }
            })
            .collect();
        let outcomes = crate::traits::apply_in_order(deletes, self.concurrency).await?;
        Ok(outcomes
            .iter()
            .filter(|o| matches!(o, RecordOutcome::Applied))
            .count() as u64)
    }

    async fn digest(&self, buckets: u32) -> ConnectorResult<Vec<BucketDigest>> {
        if buckets == 0 {
            return Err(ConnectorError::invalid(
                BACKEND,
                "buckets must be at least 1",
            ));
        }
        let mut out = vec![BucketDigest::default(); buckets as usize];
        let mut request = ScanRequest::segment(0, 1);
        request.consistent = true;
        loop {
            let page = self.table.scan(&request).await?;
            for item in page.items {
                let key = self
                    .table
                    .schema
                    .key_of(&item)
                    .map_err(|m| ConnectorError::terminal(BACKEND, m))?;
                if let Some((version, item)) = strip_reserved(&self.version_attribute, item) {
                    fold_digest(&mut out, &key, version, &item);
                }
            }
            match page.last_key {
                Some(k) => request.start_after = Some(k),
                None => return Ok(out),
            }
        }
    }

    async fn entries(&self, visit: &mut (dyn FnMut(Key, u64, Item) + Send)) -> ConnectorResult<()> {
        let mut request = ScanRequest::segment(0, 1);
        request.consistent = true;
        loop {
            let page = self.table.scan(&request).await?;
            for item in page.items {
                let key = self
                    .table
                    .schema
                    .key_of(&item)
                    .map_err(|m| ConnectorError::terminal(BACKEND, m))?;
                if let Some((version, item)) = strip_reserved(&self.version_attribute, item) {
                    visit(key, version, item);
                }
            }
            match page.last_key {
                Some(k) => request.start_after = Some(k),
                None => return Ok(()),
            }
        }
    }
}

impl DynamoTable {
    /// Counts the items of one scan segment matching a DynamoDB filter
    /// expression given as is (with its own names and values), with
    /// `Select=COUNT` so no item travels: the proof that a predicate such as
    /// `attribute_not_exists(#a)` holds for zero items.
    ///
    /// # Errors
    /// `InvalidInput` for an expression DynamoDB refuses; what the scan fails with.
    #[tracing::instrument(skip_all, fields(table = %self.name, segment))]
    pub async fn count_where(
        &self,
        expression: &str,
        names: &HashMap<String, String>,
        values: &HashMap<String, AttrValue>,
        segment: u32,
        total_segments: u32,
    ) -> ConnectorResult<u64> {
        let values: HashMap<String, DdbValue> =
            values.iter().map(|(k, v)| (k.clone(), to_ddb(v))).collect();
        let mut count = 0u64;
        let mut start: Option<HashMap<String, DdbValue>> = None;
        loop {
            let out = retry(&self.retry, "scan", || async {
                let mut scan = self
                    .client
                    .scan()
                    .table_name(&self.name)
                    .select(aws_sdk_dynamodb::types::Select::Count)
                    .filter_expression(expression)
                    .set_expression_attribute_names(non_empty(names.clone()))
                    .set_expression_attribute_values(non_empty(values.clone()))
                    .set_exclusive_start_key(start.clone());
                if total_segments > 1 {
                    scan = scan
                        .segment(i32::try_from(segment).unwrap_or(0))
                        .total_segments(i32::try_from(total_segments).unwrap_or(1));
                }
                scan.send().await.map_err(|e| classify(BACKEND, &e))
            })
            .await?;
            count += u64::try_from(out.count).unwrap_or(0);
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(count),
            }
        }
    }
}

impl DynamoTable {
    /// The keys of the items of global secondary index `index` whose
    /// partition key `attribute` is `value`, paging through the whole
    /// partition. Index reads are eventually consistent and may project only
    /// some attributes, so callers read the items themselves by key.
    ///
    /// # Errors
    /// `NotFound` for an unknown index; what the query fails with.
    #[tracing::instrument(skip_all, fields(table = %self.name, index))]
    pub async fn query_index_keys(
        &self,
        index: &str,
        attribute: &str,
        value: &AttrValue,
    ) -> ConnectorResult<Vec<Key>> {
        self.query_index_range_keys(index, attribute, value, None)
            .await
    }

    /// Like [`Self::query_index_keys`], limited to index sort keys
    /// `sort.0` in `[sort.1, sort.2)`.
    ///
    /// # Errors
    /// `NotFound` for an unknown index; what the query fails with.
    pub async fn query_index_range_keys(
        &self,
        index: &str,
        attribute: &str,
        value: &AttrValue,
        sort: Option<(&str, &AttrValue, &AttrValue)>,
    ) -> ConnectorResult<Vec<Key>> {
        let mut keys = Vec::new();
        let mut start: Option<HashMap<String, DdbValue>> = None;
        loop {
            let out = retry(&self.retry, "query", || async {
                let mut query = self
                    .client
                    .query()
                    .table_name(&self.name)
                    .index_name(index)
                    .expression_attribute_names("#u", attribute)
                    .expression_attribute_values(":u", to_ddb(value))
                    .set_exclusive_start_key(start.clone());
                query = match sort {
                    // BETWEEN is inclusive; the exclusive end is checked by
                    // the caller on the items it reads.
                    Some((name, from, to)) => query
                        .key_condition_expression("#u = :u AND #s BETWEEN :a AND :b")
                        .expression_attribute_names("#s", name)
                        .expression_attribute_values(":a", to_ddb(from))
                        .expression_attribute_values(":b", to_ddb(to)),
                    None => query.key_condition_expression("#u = :u"),
                };
                query.send().await.map_err(|e| classify(BACKEND, &e))
            })
            .await?;
            for item in out.items() {
                let item = item_from_ddb(item)?;
                keys.push(
                    self.schema
                        .key_of(&item)
                        .map_err(|e| ConnectorError::invalid(BACKEND, e))?,
                );
            }
            match out.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(keys),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A client that is never reached: the checks run before any request.
    fn unreachable_client() -> Client {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .endpoint_url("http://127.0.0.1:9")
            .build();
        Client::from_conf(config)
    }

    /// An endpoint that accepts connections and never answers (a hung
    /// service, or a connection left half-open by a network fault),
    /// counting the connections it was given.
    async fn silent_endpoint() -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = seen.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        });
        (format!("http://{addr}"), seen)
    }

    #[test]
    fn every_attempt_is_bounded_unless_configured_otherwise() {
        use aws_smithy_types::timeout::TimeoutConfig;
        let sdk = unreachable_client();
        let own = own_retries(&sdk);
        let timeouts = own.config().timeout_config().unwrap();
        assert_eq!(
            timeouts.operation_attempt_timeout(),
            Some(crate::aws::ATTEMPT_TIMEOUT)
        );
        let kept = crate::aws::bounded_attempts(
            Some(
                &TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(Duration::from_secs(7))
                    .build(),
            ),
            crate::aws::ATTEMPT_TIMEOUT,
        );
        assert_eq!(kept.connect_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(
            kept.operation_attempt_timeout(),
            Some(Duration::from_secs(7))
        );
        let disabled = crate::aws::bounded_attempts(
            Some(&TimeoutConfig::disabled()),
            crate::aws::ATTEMPT_TIMEOUT,
        );
        assert_eq!(disabled.operation_attempt_timeout(), None);
    }

    #[tokio::test]
    async fn a_call_to_an_endpoint_that_never_answers_fails_retryably_and_is_retried() {
        let (endpoint, seen) = silent_endpoint().await;
        // Before attempts were bounded, this call never returned (the
        // test's own timeout below would fail it).
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .endpoint_url(&endpoint)
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .timeout_config(
                aws_smithy_types::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_millis(200))
                    .build(),
            )
            .build();
        let client = own_retries(&Client::from_conf(config));
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        };
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            retry(&policy, "describe table", || async {
                client
                    .describe_table()
                    .table_name("t-silent")
                    .send()
                    .await
                    .map_err(|e| classify(BACKEND, &e))
            }),
        )
        .await
        .expect("each attempt must end at its timeout")
        .unwrap_err();
        assert!(
            err.is_retryable(),
            "a timed-out attempt is retryable: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "one connection per attempt: a timed-out one is not reused"
        );
    }

    #[test]
    fn table_names_follow_dynamodb_rules() {
        for good in ["abc", "stats-v2", "a.b_c-D9", &"t".repeat(255)] {
            assert!(check_table_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "ab",
            &"t".repeat(256),
            "has space",
            "naïve",
            "a/b",
            "tab\u{0}le",
        ] {
            let err = check_table_name(bad).unwrap_err();
            assert!(
                matches!(err, ConnectorError::InvalidInput { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn opening_a_table_with_a_2_mb_name_is_invalid_input() {
        // Sent as is, DynamoDB's refusal classified as terminal and callers
        // (BackfillAttribute) answered INTERNAL.
        let name = "t".repeat(2 << 20);
        let err = DynamoTable::open(unreachable_client(), &name)
            .await
            .err()
            .expect("a 2 MB name must be refused");
        let ConnectorError::InvalidInput { message, .. } = &err else {
            panic!("expected InvalidInput, got {err}");
        };
        assert!(message.contains("3 to 255"), "{message}");
        assert!(message.len() < 200, "the message must not echo the name");
    }
}
