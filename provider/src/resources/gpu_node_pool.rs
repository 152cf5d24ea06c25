//! `agentplane_gpu_node_pool`: an EKS managed node group for GPU workers: NVIDIA AMI, a GPU
//! taint so only pods that ask for GPUs land there, a pool label, and scaling bounds.
//!
//! `desired_size` is set when the pool is created and is not fought afterwards: an autoscaler
//! (cluster-autoscaler, Karpenter, KEDA-driven scaling) owns it. Reads keep the value in state
//! when AWS reports another one, plans keep the prior value, and a change of `min_size` or
//! `max_size` sends the node group's *current* desired size clamped into the new bounds.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use aws_sdk_eks::Client;
use aws_sdk_eks::types::{
    AmiTypes, CapacityTypes, Nodegroup, NodegroupScalingConfig, NodegroupStatus, Taint,
    TaintEffect, UpdateLabelsPayload, UpdateTaintsPayload,
};

use super::{cluster, label, tag_diff, tags_value};
use crate::aws;
use crate::config::ProviderData;
use crate::eks::{
    self, DEFAULT_WAIT_SECONDS, Progress, WAIT_SECONDS, fill_unknown, string_set, strings, typed,
};
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, Resource, Schema, Type, Validator, Value,
};

pub const TYPE: &str = "agentplane_gpu_node_pool";

pub struct GpuNodePool;

/// Node group names: up to 63 characters.
const MAX_NAME: usize = 63;
/// EKS allows at most 50 taints per node group.
pub const MAX_TAINTS: usize = 50;
/// Kubernetes taint keys/values as EKS accepts them: key 1-63, value up to 63 characters.
const MAX_TAINT_KEY: usize = 63;
const MAX_TAINT_VALUE: usize = 63;
pub const EFFECTS: &[&str] = &["NO_SCHEDULE", "NO_EXECUTE", "PREFER_NO_SCHEDULE"];
pub const CAPACITY_TYPES: &[&str] = &["ON_DEMAND", "SPOT"];
/// The label every pool gets by default, so workloads can select a pool by name.
pub const POOL_LABEL: &str = "agentplane.dev/pool";
/// The GPU taint a pool gets by default: only pods tolerating it (GPU workers) land there.
pub const GPU_TAINT: (&str, &str, &str) = ("nvidia.com/gpu", "true", "NO_SCHEDULE");
/// One NVIDIA A10G (24 GiB), 4 vCPUs, 16 GiB: the smallest current-generation GPU instance
/// that serves 7-13B models, and widely available.
pub const DEFAULT_INSTANCE_TYPE: &str = "g5.xlarge";
pub const DEFAULT_AMI_TYPE: &str = "AL2023_x86_64_NVIDIA";
/// GiB. The EKS default (20) is too small for CUDA images and model weights.
pub const DEFAULT_DISK_SIZE: i64 = 100;
const SIZE_MAX: i64 = i32::MAX as i64;

fn taint_type() -> Type {
    Type::Object(BTreeMap::from([
        ("key".to_string(), Type::String),
        ("value".to_string(), Type::String),
        ("effect".to_string(), Type::String),
    ]))
}

fn taint_value(key: &str, value: Option<&str>, effect: &str) -> Value {
    Value::Object(BTreeMap::from([
        ("key".to_string(), Value::string(key)),
        ("value".to_string(), Value::opt_string(value)),
        ("effect".to_string(), Value::string(effect)),
    ]))
}

/// The default `taints`: the one GPU taint.
pub fn default_taints() -> Value {
    Value::List(vec![taint_value(
        GPU_TAINT.0,
        Some(GPU_TAINT.1),
        GPU_TAINT.2,
    )])
}

fn schema_block() -> Block {
    Block::new("An EKS managed node group of GPU nodes for agentplane workers. Defaults: `g5.xlarge` instances, the `AL2023_x86_64_NVIDIA` AMI, a 100 GiB disk, the taint `nvidia.com/gpu=true:NO_SCHEDULE` and the label `agentplane.dev/pool = <name>`. `desired_size` is only set at creation; afterwards it belongs to the autoscaler and never shows as a diff.")
        .attr(Attribute::string("id").computed().describe("`<cluster_name>:<name>`."))
        .attr(Attribute::string("cluster_name").required().force_new().describe("Name of the EKS cluster (e.g. `agentplane_cluster.c.name`). Changing it replaces the pool."))
        .attr(Attribute::string("name").required().force_new().describe("Node group name: 1-63 letters, digits, `-` and `_`, starting with a letter or digit. Changing it replaces the pool."))
        .attr(Attribute::string("node_role_arn").required().force_new().describe("ARN of the IAM role the nodes run as. Changing it replaces the pool."))
        .attr(typed("subnet_ids", Type::set(Type::String)).required().force_new().describe("Subnets the nodes are launched in. Changing them replaces the pool."))
        .attr(
            typed("instance_types", Type::list(Type::String))
                .default(Value::List(vec![Value::string(DEFAULT_INSTANCE_TYPE)]))
                .force_new()
                .describe("EC2 instance types, in order of preference. Default `[\"g5.xlarge\"]` (one NVIDIA A10G). Changing them replaces the pool."),
        )
        .attr(
            Attribute::string("ami_type")
                .default(Value::string(DEFAULT_AMI_TYPE))
                .force_new()
                .validate(Validator::OneOf(AmiTypes::values()))
                .describe("EKS AMI type. Default `AL2023_x86_64_NVIDIA` (NVIDIA driver and container toolkit preinstalled). Changing it replaces the pool."),
        )
        .attr(
            Attribute::string("capacity_type")
                .default(Value::string("ON_DEMAND"))
                .force_new()
                .validate(Validator::OneOf(CAPACITY_TYPES))
                .describe("`ON_DEMAND` (default) or `SPOT`. Changing it replaces the pool."),
        )
        .attr(
            Attribute::number("disk_size")
                .default(Value::int(DEFAULT_DISK_SIZE))
                .force_new()
                .validate(Validator::IntRange(1, 16_384))
                .describe("Root volume size in GiB. Default 100 (GPU images and model caches are large). Changing it replaces the pool."),
        )
        .attr(
            Attribute::number("min_size")
                .default(Value::int(1))
                .validate(Validator::IntRange(0, SIZE_MAX))
                .describe("Fewest nodes. Default 1. Updated in place."),
        )
        .attr(
            Attribute::number("max_size")
                .default(Value::int(1))
                .validate(Validator::IntRange(1, SIZE_MAX))
                .describe("Most nodes. Default 1. Updated in place."),
        )
        .attr(
            Attribute::number("desired_size")
                .optional()
                .computed()
                .validate(Validator::IntRange(0, SIZE_MAX))
                .describe("Nodes at creation, within [min_size, max_size]; default min_size. Only used when the pool is created: afterwards the autoscaler owns it, so changes in AWS or in this value plan no diff. A change of min_size/max_size keeps the current size, clamped into the new bounds."),
        )
        .attr(
            typed("taints", Type::list(taint_type()))
                .optional()
                .computed()
                .default(default_taints())
                .describe("Kubernetes taints of the nodes: objects `{ key, value, effect }` with effect `NO_SCHEDULE`, `NO_EXECUTE` or `PREFER_NO_SCHEDULE` (value may be null); at most 50. Default `[{ key = \"nvidia.com/gpu\", value = \"true\", effect = \"NO_SCHEDULE\" }]`; `[]` for none. Updated in place."),
        )
        .attr(Attribute::string_map("labels").optional().computed().describe("Kubernetes labels of the nodes. Default `{ \"agentplane.dev/pool\" = <name> }`; when set, it replaces the default (add the pool label yourself if you select on it); `{}` for none. Updated in place."))
        .attr(Attribute::string_map("tags").optional().describe("Tags of the node group. Updated in place."))
        .attr(
            Attribute::number("wait_timeout_seconds")
                .default(Value::int(DEFAULT_WAIT_SECONDS))
                .validate(Validator::IntRange(WAIT_SECONDS.0, WAIT_SECONDS.1))
                .describe("How long create, update and destroy wait for the node group to become `ACTIVE` (or to disappear), in seconds. Default 1200."),
        )
        .attr(Attribute::string("arn").computed().describe("Node group ARN."))
        .attr(Attribute::string("status").computed().describe("Node group status as last read (`ACTIVE` after a successful apply)."))
        .attr(typed("autoscaling_group_names", Type::list(Type::String)).computed().describe("Names of the Auto Scaling groups behind the node group (for autoscaler configuration)."))
}

fn what(v: &Value) -> String {
    match (v.get("cluster_name").as_str(), v.get("name").as_str()) {
        (Some(c), Some(n)) => label(TYPE, Some(&format!("{c}:{n}"))),
        (_, n) => label(TYPE, n),
    }
}

fn int(v: &Value, name: &str) -> Option<i64> {
    v.get(name).as_i64()
}

/// A configured size, or the schema default when it is null; `None` when unknown.
fn size_or_default(config: &Value, name: &str, default: i64) -> Option<i64> {
    match config.get(name) {
        Value::Null => Some(default),
        v => v.as_i64(),
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::List(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// Taints of a value as (key, value, effect).
fn taint_triples(v: &Value) -> Vec<(String, Option<String>, String)> {
    items(v)
        .iter()
        .filter_map(|t| {
            Some((
                t.get("key").as_str()?.to_string(),
                t.get("value").as_str().map(str::to_string),
                t.get("effect").as_str()?.to_string(),
            ))
        })
        .collect()
}

fn eks_taint((key, value, effect): &(String, Option<String>, String)) -> Taint {
    let mut b = Taint::builder()
        .key(key)
        .effect(TaintEffect::from(effect.as_str()));
    if let Some(v) = value {
        b = b.value(v);
    }
    b.build()
}

/// Taints as read from AWS, in the order `prior` lists them (EKS does not keep order), so an
/// unchanged set of taints plans no diff. Taints prior does not know go last.
fn taints_value(aws: &[Taint], prior: &Value) -> Value {
    let mut rest: Vec<(String, Option<String>, String)> = aws
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().map(str::to_string),
                t.effect().map_or("", |e| e.as_str()).to_string(),
            )
        })
        .collect();
    let mut ordered = Vec::with_capacity(rest.len());
    for (k, _, e) in taint_triples(prior) {
        if let Some(i) = rest.iter().position(|(rk, _, re)| *rk == k && *re == e) {
            ordered.push(rest.remove(i));
        }
    }
    ordered.extend(rest);
    Value::List(
        ordered
            .iter()
            .map(|(k, v, e)| taint_value(k, v.as_deref(), e))
            .collect(),
    )
}

/// The state attributes DescribeNodegroup reports, laid over `prior`. `desired_size` is taken
/// from AWS only when `prior` has none (after an import): otherwise the autoscaler's value is
/// not drift.
pub fn observe(ng: &Nodegroup, prior: &Value) -> Value {
    let mut s = match prior {
        Value::Object(_) => prior.clone(),
        _ => Value::Object(BTreeMap::new()),
    };
    let cluster = ng
        .cluster_name()
        .or(prior.get("cluster_name").as_str())
        .unwrap_or_default()
        .to_string();
    let name = ng
        .nodegroup_name()
        .or(prior.get("name").as_str())
        .unwrap_or_default()
        .to_string();
    s.set("id", Value::String(format!("{cluster}:{name}")));
    s.set("cluster_name", Value::String(cluster));
    s.set("name", Value::String(name));
    s.set("arn", Value::opt_string(ng.nodegroup_arn()));
    s.set("node_role_arn", Value::opt_string(ng.node_role()));
    s.set("subnet_ids", string_set(ng.subnets().to_vec()));
    s.set(
        "instance_types",
        Value::List(ng.instance_types().iter().map(Value::string).collect()),
    );
    s.set(
        "ami_type",
        Value::opt_string(ng.ami_type().map(|a| a.as_str())),
    );
    s.set(
        "capacity_type",
        Value::opt_string(ng.capacity_type().map(|c| c.as_str())),
    );
    // A node group built from a launch template reports no disk size; keep state's then.
    if let Some(d) = ng.disk_size() {
        s.set("disk_size", Value::int(i64::from(d)));
    }
    if let Some(sc) = ng.scaling_config() {
        if let Some(n) = sc.min_size() {
            s.set("min_size", Value::int(i64::from(n)));
        }
        if let Some(n) = sc.max_size() {
            s.set("max_size", Value::int(i64::from(n)));
        }
        if prior.get("desired_size").as_i64().is_none()
            && let Some(n) = sc.desired_size()
        {
            s.set("desired_size", Value::int(i64::from(n)));
        }
    }
    s.set("taints", taints_value(ng.taints(), prior.get("taints")));
    s.set(
        "labels",
        Value::Map(
            ng.labels()
                .map(|l| {
                    l.iter()
                        .map(|(k, v)| (k.clone(), Value::string(v)))
                        .collect()
                })
                .unwrap_or_default(),
        ),
    );
    s.set(
        "tags",
        tags_value(
            ng.tags()
                .map(|t| t.clone().into_iter().collect())
                .unwrap_or_default(),
            prior.get("tags"),
        ),
    );
    if s.get("wait_timeout_seconds").is_null() {
        s.set("wait_timeout_seconds", Value::int(DEFAULT_WAIT_SECONDS));
    }
    s.set(
        "status",
        Value::opt_string(ng.status().map(|st| st.as_str())),
    );
    s.set(
        "autoscaling_group_names",
        Value::List(
            ng.resources()
                .map(|r| {
                    r.auto_scaling_groups()
                        .iter()
                        .filter_map(|g| g.name().map(Value::string))
                        .collect()
                })
                .unwrap_or_default(),
        ),
    );
    s
}

/// The desired size to plan. At creation: the configured one, or min_size. Afterwards: the
/// prior one (the autoscaler owns it), unless the new bounds exclude it; then the configured
/// value (valid config is within the bounds) or the prior one clamped into them.
pub fn plan_desired(prior: &Value, planned: &Value, config: &Value) -> Value {
    let (min, max) = (int(planned, "min_size"), int(planned, "max_size"));
    let cfg = config.get("desired_size");
    if prior.is_null() {
        return match (cfg, min) {
            (Value::Null, Some(m)) => Value::int(m),
            (Value::Null, None) => Value::UNKNOWN,
            (v, _) => v.clone(),
        };
    }
    let Some(old) = int(prior, "desired_size") else {
        return planned.get("desired_size").clone();
    };
    match (min, max) {
        (Some(lo), Some(hi)) if lo <= hi && !(lo..=hi).contains(&old) => match cfg.as_i64() {
            Some(c) if (lo..=hi).contains(&c) => Value::int(c),
            _ => Value::int(old.clamp(lo, hi)),
        },
        _ => Value::int(old),
    }
}

/// Keys to remove and labels to add or change.
fn label_diff(old: &Value, new: &Value) -> (Vec<String>, BTreeMap<String, String>) {
    tag_diff(&old.as_string_map(), &new.as_string_map())
}

type TaintTriple = (String, Option<String>, String);

/// Taints to remove (by key and effect, which identify a taint) and to add or change.
fn taint_diff(old: &Value, new: &Value) -> (Vec<TaintTriple>, Vec<TaintTriple>) {
    let (old, new) = (taint_triples(old), taint_triples(new));
    let removed = old
        .iter()
        .filter(|(k, _, e)| !new.iter().any(|(nk, _, ne)| nk == k && ne == e))
        .cloned()
        .collect();
    let added = new.iter().filter(|t| !old.contains(t)).cloned().collect();
    (removed, added)
}

/// DescribeNodegroup; `None` when the node group (or its cluster) does not exist.
async fn describe(
    c: &Client,
    cluster: &str,
    name: &str,
    w: &str,
) -> Result<Option<Nodegroup>, Diagnostics> {
    match c
        .describe_nodegroup()
        .cluster_name(cluster)
        .nodegroup_name(name)
        .send()
        .await
    {
        Ok(o) => Ok(o.nodegroup),
        Err(e) if eks::is_not_found(&e) => Ok(None),
        Err(e) => Err(aws::diag(&e, w, "eks:DescribeNodegroup")),
    }
}

fn health(ng: &Nodegroup) -> String {
    let issues: Vec<String> = ng
        .health()
        .map(|h| {
            h.issues()
                .iter()
                .map(|i| {
                    format!(
                        "{}: {}",
                        i.code().map_or("Issue", |c| c.as_str()),
                        i.message().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if issues.is_empty() {
        "EKS reported no health issues.".into()
    } else {
        issues.join("; ")
    }
}

async fn wait_active(
    c: &Client,
    cluster: &str,
    name: &str,
    planned: &Value,
    w: &str,
) -> Result<Nodegroup, Diagnostics> {
    eks::wait_for(
        eks::wait_timeout(planned),
        w,
        "ACTIVE",
        &format!("The node group exists in AWS: once it is ACTIVE, bring it under management with `terraform import <address> {cluster}:{name}` (or delete it in AWS) and apply again."),
        || async move {
            let Some(ng) = describe(c, cluster, name, w).await? else {
                return Err(Diagnostics::single(
                    format!("{w} disappeared"),
                    format!("EKS no longer knows node group {name:?} of cluster {cluster:?} while waiting for it to become ACTIVE."),
                ));
            };
            match ng.status() {
                Some(NodegroupStatus::Active) => Ok(Progress::Done(ng)),
                Some(s @ (NodegroupStatus::CreateFailed | NodegroupStatus::Degraded)) => {
                    Err(Diagnostics::single(
                        format!("{w} is {}", s.as_str()),
                        format!("EKS reports node group {name:?} as {}: {}", s.as_str(), health(&ng)),
                    ))
                }
                Some(NodegroupStatus::Deleting | NodegroupStatus::DeleteFailed) => {
                    Err(Diagnostics::single(
                        format!("{w} is being deleted"),
                        format!("Node group {name:?} is being deleted (by someone else) while waiting for it to become ACTIVE."),
                    ))
                }
                other => Ok(Progress::Waiting(
                    other.map_or("CREATING", |s| s.as_str()).to_string(),
                )),
            }
        },
    )
    .await
}

fn scaling(min: i64, max: i64, desired: i64) -> NodegroupScalingConfig {
    // Validated to fit i32 (the API's type) before any call.
    let n = |v: i64| i32::try_from(v).unwrap_or(i32::MAX);
    NodegroupScalingConfig::builder()
        .min_size(n(min))
        .max_size(n(max))
        .desired_size(n(desired))
        .build()
}

#[async_trait]
impl Resource<ProviderData> for GpuNodePool {
    fn type_name(&self) -> &'static str {
        TYPE
    }

    fn schema(&self) -> Schema {
        Schema {
            version: 0,
            block: schema_block(),
        }
    }

    fn validate(&self, config: &Value, diags: &mut Diagnostics) {
        if let Some(c) = config.get("cluster_name").as_str() {
            cluster::validate_name(c, AttrPath::attr("cluster_name"), diags);
        }
        if let Some(n) = config.get("name").as_str()
            && !eks::valid_name(n, MAX_NAME)
        {
            diags.attr_error(
                AttrPath::attr("name"),
                "Invalid node pool name",
                format!("name {n:?}: node group names are 1-{MAX_NAME} letters, digits, '-' and '_', starting with a letter or digit."),
            );
        }
        if let Some(arn) = config.get("node_role_arn").as_str()
            && !eks::valid_role_arn(arn)
        {
            diags.attr_error(
                AttrPath::attr("node_role_arn"),
                "Invalid role ARN",
                format!("node_role_arn {arn:?} must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)."),
            );
        }
        for attr in ["subnet_ids", "instance_types"] {
            let v = config.get(attr);
            if v.is_wholly_known() && matches!(v, Value::List(i) | Value::Set(i) if i.is_empty()) {
                diags.attr_error(
                    AttrPath::attr(attr),
                    "Empty list",
                    format!("{attr} needs at least one entry."),
                );
            }
        }

        let min = size_or_default(config, "min_size", 1);
        let max = size_or_default(config, "max_size", 1);
        if let (Some(lo), Some(hi)) = (min, max)
            && lo > hi
        {
            diags.attr_error(
                AttrPath::attr("min_size"),
                "min_size is larger than max_size",
                format!("min_size ({lo}) must not be larger than max_size ({hi})."),
            );
        }
        if let (Some(lo), Some(hi), Some(d)) = (min, max, config.get("desired_size").as_i64())
            && lo <= hi
            && !(lo..=hi).contains(&d)
        {
            diags.attr_error(
                AttrPath::attr("desired_size"),
                "desired_size out of bounds",
                format!("desired_size ({d}) must be within min_size ({lo}) and max_size ({hi})."),
            );
        }

        let taints = config.get("taints");
        let list = items(taints);
        if list.len() > MAX_TAINTS {
            diags.attr_error(
                AttrPath::attr("taints"),
                "Too many taints",
                format!(
                    "taints has {} entries; EKS allows at most {MAX_TAINTS} per node group.",
                    list.len()
                ),
            );
        }
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (i, t) in list.iter().enumerate() {
            let p = AttrPath::attr("taints").index(i as i64);
            let key = t.get("key");
            if let Some(k) = key.as_str() {
                if k.is_empty() || k.chars().count() > MAX_TAINT_KEY {
                    diags.attr_error(
                        p.join("key"),
                        "Invalid taint key",
                        format!("taints[{i}].key {k:?} must be 1-{MAX_TAINT_KEY} characters."),
                    );
                }
            } else if key.is_null() {
                diags.attr_error(
                    p.join("key"),
                    "Missing taint key",
                    format!("taints[{i}].key is required."),
                );
            }
            if let Some(v) = t.get("value").as_str()
                && v.chars().count() > MAX_TAINT_VALUE
            {
                diags.attr_error(
                    p.join("value"),
                    "Invalid taint value",
                    format!("taints[{i}].value must be at most {MAX_TAINT_VALUE} characters."),
                );
            }
            let effect = t.get("effect");
            match effect.as_str() {
                Some(e) if !EFFECTS.contains(&e) => diags.attr_error(
                    p.join("effect"),
                    "Invalid taint effect",
                    format!(
                        "taints[{i}].effect must be one of {}, got {e:?}.",
                        EFFECTS.join(", ")
                    ),
                ),
                None if effect.is_null() => diags.attr_error(
                    p.join("effect"),
                    "Missing taint effect",
                    format!("taints[{i}].effect is required."),
                ),
                _ => {}
            }
            if let (Some(k), Some(e)) = (key.as_str(), effect.as_str()) {
                if seen.contains(&(k, e)) {
                    diags.attr_error(
                        p,
                        "Duplicate taint",
                        format!("taints[{i}] repeats key {k:?} with effect {e}; a node can carry each key/effect pair once."),
                    );
                } else {
                    seen.push((k, e));
                }
            }
        }
        if let Value::Map(m) = config.get("labels") {
            for k in m.keys().filter(|k| k.is_empty()) {
                diags.attr_error(
                    AttrPath::attr("labels").key(k),
                    "Invalid label",
                    "Label keys cannot be empty.",
                );
            }
        }
    }

    fn modify_plan(
        &self,
        prior: &Value,
        planned: &mut Value,
        config: &Value,
        _diags: &mut Diagnostics,
    ) {
        let (cluster, name) = (
            planned.get("cluster_name").clone(),
            planned.get("name").clone(),
        );
        planned.set(
            "id",
            match (cluster.as_str(), name.as_str()) {
                (Some(c), Some(n)) => Value::String(format!("{c}:{n}")),
                _ => Value::UNKNOWN,
            },
        );
        if config.get("labels").is_null() {
            planned.set(
                "labels",
                match name.as_str() {
                    Some(n) => {
                        Value::Map(BTreeMap::from([(POOL_LABEL.to_string(), Value::string(n))]))
                    }
                    None => Value::UNKNOWN,
                },
            );
        }
        let desired = plan_desired(prior, planned, config);
        planned.set("desired_size", desired);
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        let c = data.eks().await;
        let w = what(planned);
        let cluster = planned
            .get("cluster_name")
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = planned.get("name").as_str().unwrap_or_default().to_string();
        let min = int(planned, "min_size").unwrap_or(1);
        let max = int(planned, "max_size").unwrap_or(1);
        let desired = int(planned, "desired_size").unwrap_or(min);
        let mut req = c
            .create_nodegroup()
            .cluster_name(&cluster)
            .nodegroup_name(&name)
            .node_role(planned.get("node_role_arn").as_str().unwrap_or_default())
            .set_subnets(Some(strings(planned.get("subnet_ids"))))
            .set_instance_types(Some(strings(planned.get("instance_types"))))
            .ami_type(AmiTypes::from(
                planned.get("ami_type").as_str().unwrap_or(DEFAULT_AMI_TYPE),
            ))
            .capacity_type(CapacityTypes::from(
                planned.get("capacity_type").as_str().unwrap_or("ON_DEMAND"),
            ))
            .disk_size(
                int(planned, "disk_size")
                    .and_then(|d| i32::try_from(d).ok())
                    .unwrap_or(DEFAULT_DISK_SIZE as i32),
            )
            .scaling_config(scaling(min, max, desired));
        let labels: HashMap<String, String> =
            planned.get("labels").as_string_map().into_iter().collect();
        if !labels.is_empty() {
            req = req.set_labels(Some(labels));
        }
        let taints: Vec<Taint> = taint_triples(planned.get("taints"))
            .iter()
            .map(eks_taint)
            .collect();
        if !taints.is_empty() {
            req = req.set_taints(Some(taints));
        }
        let tags = planned.get("tags").as_string_map();
        if !tags.is_empty() {
            req = req.set_tags(Some(tags.into_iter().collect()));
        }
        req.send()
            .await
            .map_err(|e| aws::diag(&e, &w, "eks:CreateNodegroup"))?;
        tracing::info!(%cluster, nodegroup = %name, "created EKS node group; waiting for ACTIVE");
        let ng = wait_active(c, &cluster, &name, planned, &w).await?;
        Ok(fill_unknown(planned, &observe(&ng, planned)))
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        let c = data.eks().await;
        let w = what(state);
        let (Some(cluster), Some(name)) = (
            state.get("cluster_name").as_str(),
            state.get("name").as_str(),
        ) else {
            return Ok(None);
        };
        match describe(c, cluster, name, &w).await? {
            Some(ng) => Ok(Some(observe(&ng, state))),
            None => {
                tracing::info!(%cluster, nodegroup = %name, "node group no longer exists");
                Ok(None)
            }
        }
    }

    async fn update(
        &self,
        data: &ProviderData,
        prior: &Value,
        planned: &Value,
    ) -> Result<Value, Diagnostics> {
        let c = data.eks().await;
        let w = what(planned);
        let cluster = prior
            .get("cluster_name")
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = prior.get("name").as_str().unwrap_or_default().to_string();

        let mut req = c
            .update_nodegroup_config()
            .cluster_name(&cluster)
            .nodegroup_name(&name);
        let mut changed = false;

        let (rm, set) = label_diff(prior.get("labels"), planned.get("labels"));
        if !rm.is_empty() || !set.is_empty() {
            let mut b = UpdateLabelsPayload::builder();
            if !rm.is_empty() {
                b = b.set_remove_labels(Some(rm));
            }
            if !set.is_empty() {
                b = b.set_add_or_update_labels(Some(set.into_iter().collect()));
            }
            req = req.labels(b.build());
            changed = true;
        }
        let (rm, add) = taint_diff(prior.get("taints"), planned.get("taints"));
        if !rm.is_empty() || !add.is_empty() {
            let mut b = UpdateTaintsPayload::builder();
            if !rm.is_empty() {
                b = b.set_remove_taints(Some(rm.iter().map(eks_taint).collect()));
            }
            if !add.is_empty() {
                b = b.set_add_or_update_taints(Some(add.iter().map(eks_taint).collect()));
            }
            req = req.taints(b.build());
            changed = true;
        }
        let (min, max) = (
            int(planned, "min_size").unwrap_or(1),
            int(planned, "max_size").unwrap_or(1),
        );
        if int(prior, "min_size") != Some(min)
            || int(prior, "max_size") != Some(max)
            || prior.get("desired_size") != planned.get("desired_size")
        {
            // Keep the size the autoscaler chose; only pull it into the new bounds.
            let current = describe(c, &cluster, &name, &w)
                .await?
                .and_then(|ng| ng.scaling_config().and_then(|s| s.desired_size()))
                .map(i64::from)
                .or(int(planned, "desired_size"))
                .unwrap_or(min);
            req = req.scaling_config(scaling(min, max, current.clamp(min, max)));
            changed = true;
        }
        if changed {
            let out = req
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "eks:UpdateNodegroupConfig"))?;
            let timeout = eks::wait_timeout(planned);
            eks::wait_update(c, &cluster, Some(&name), out.update(), timeout, &w).await?;
            wait_active(c, &cluster, &name, planned, &w).await?;
        }

        let (old_tags, new_tags) = (
            prior.get("tags").as_string_map(),
            planned.get("tags").as_string_map(),
        );
        let (removed, set) = tag_diff(&old_tags, &new_tags);
        let arn = prior.get("arn").as_str().unwrap_or_default().to_string();
        if !removed.is_empty() {
            c.untag_resource()
                .resource_arn(&arn)
                .set_tag_keys(Some(removed))
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "eks:UntagResource"))?;
        }
        if !set.is_empty() {
            c.tag_resource()
                .resource_arn(&arn)
                .set_tags(Some(set.into_iter().collect()))
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "eks:TagResource"))?;
        }

        if planned.is_wholly_known() {
            return Ok(planned.clone());
        }
        match describe(c, &cluster, &name, &w).await? {
            Some(ng) => Ok(fill_unknown(planned, &observe(&ng, planned))),
            None => Err(Diagnostics::single(
                format!("{w} disappeared"),
                format!("Node group {name:?} no longer exists after the update."),
            )),
        }
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let c = data.eks().await;
        let w = what(state);
        let (Some(cluster), Some(name)) = (
            state.get("cluster_name").as_str(),
            state.get("name").as_str(),
        ) else {
            return Ok(());
        };
        match c
            .delete_nodegroup()
            .cluster_name(cluster)
            .nodegroup_name(name)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if eks::is_not_found(&e) => return Ok(()),
            Err(e) => return Err(aws::diag(&e, &w, "eks:DeleteNodegroup")),
        }
        tracing::info!(%cluster, nodegroup = %name, "deleting EKS node group; waiting until it is gone");
        let w = &w;
        eks::wait_for(
            eks::wait_timeout(state),
            w,
            "deleted",
            "Deletion goes on in AWS; run destroy again to wait for it.",
            || async move {
                match describe(c, cluster, name, w).await? {
                    None => Ok(Progress::Done(())),
                    Some(ng) if ng.status() == Some(&NodegroupStatus::DeleteFailed) => {
                        Err(Diagnostics::single(
                            format!("Deleting {w} failed"),
                            format!("EKS reports DELETE_FAILED: {}", health(&ng)),
                        ))
                    }
                    Some(ng) => Ok(Progress::Waiting(
                        ng.status().map_or("DELETING", |s| s.as_str()).to_string(),
                    )),
                }
            },
        )
        .await
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        let parsed = id.split_once(':').filter(|(c, n)| {
            eks::valid_name(c, 100) && eks::valid_name(n, MAX_NAME) && !n.contains(':')
        });
        let Some((cluster, name)) = parsed else {
            return Err(Diagnostics::single(
                "Invalid import ID",
                format!(
                    "{id:?} is not <cluster_name>:<node_pool_name>; import an agentplane_gpu_node_pool as e.g. \"agentplane:gpu\"."
                ),
            ));
        };
        Ok(Value::Object(BTreeMap::from([
            ("id".to_string(), Value::string(id)),
            ("cluster_name".to_string(), Value::string(cluster)),
            ("name".to_string(), Value::string(name)),
        ])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framework::codec::from_json;

    fn validate(j: serde_json::Value) -> Vec<String> {
        let r = GpuNodePool;
        let schema = r.schema();
        let v = from_json(&j, &schema.block.ty(), &AttrPath::root(), 0).unwrap();
        let mut d = Diagnostics::new();
        schema.block.validate_config(&v, &AttrPath::root(), &mut d);
        r.validate(&v, &mut d);
        d.0.into_iter()
            .map(|d| d.path.map(|p| p.to_string()).unwrap_or_default())
            .collect()
    }

    fn ok() -> serde_json::Value {
        serde_json::json!({
            "cluster_name": "agentplane",
            "name": "gpu",
            "node_role_arn": "arn:aws:iam::123456789012:role/node",
            "subnet_ids": ["subnet-a"],
        })
    }

    fn with(pairs: &[(&str, serde_json::Value)]) -> serde_json::Value {
        let mut j = ok();
        for (k, v) in pairs {
            j[*k] = v.clone();
        }
        j
    }

    fn taint(k: &str, e: &str) -> serde_json::Value {
        serde_json::json!({"key": k, "value": "v", "effect": e})
    }

    #[test]
    fn validation_names_the_attribute() {
        assert!(validate(ok()).is_empty());
        assert_eq!(validate(with(&[("name", "".into())])), vec!["name"]);
        assert_eq!(
            validate(with(&[("cluster_name", "".into())])),
            vec!["cluster_name"]
        );
        assert_eq!(
            validate(with(&[("min_size", 3.into()), ("max_size", 2.into())])),
            vec!["min_size"]
        );
        assert_eq!(
            validate(with(&[("min_size", 2.into())])),
            vec!["min_size"],
            "max_size defaults to 1"
        );
        assert_eq!(
            validate(with(&[("max_size", 3.into()), ("desired_size", 4.into())])),
            vec!["desired_size"]
        );
        assert_eq!(
            validate(with(&[("capacity_type", "RESERVED".into())])),
            vec!["capacity_type"]
        );
        assert_eq!(
            validate(with(&[("ami_type", "UBUNTU".into())])),
            vec!["ami_type"]
        );
        assert_eq!(
            validate(with(&[(
                "taints",
                serde_json::json!([taint("a", "NO_SCHEDULE"), taint("b", "SOMETIMES")])
            )])),
            vec!["taints[1].effect"]
        );
        assert_eq!(
            validate(with(&[(
                "taints",
                serde_json::json!([taint("a", "NO_SCHEDULE"), taint("a", "NO_SCHEDULE")])
            )])),
            vec!["taints[1]"]
        );
        assert_eq!(
            validate(with(&[(
                "taints",
                serde_json::json!([taint("", "NO_EXECUTE")])
            )])),
            vec!["taints[0].key"]
        );
        let many: Vec<_> = (0..51)
            .map(|i| taint(&format!("k{i}"), "NO_SCHEDULE"))
            .collect();
        assert_eq!(
            validate(with(&[("taints", serde_json::json!(many))])),
            vec!["taints"]
        );
        assert_eq!(
            validate(with(&[("subnet_ids", serde_json::json!([]))])),
            vec!["subnet_ids"]
        );
        assert_eq!(
            validate(with(&[("node_role_arn", "node".into())])),
            vec!["node_role_arn"]
        );
    }

    fn obj(pairs: &[(&str, Value)]) -> Value {
        Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    fn sizes(min: i64, max: i64, desired: Option<i64>) -> Value {
        obj(&[
            ("min_size", Value::int(min)),
            ("max_size", Value::int(max)),
            ("desired_size", desired.map_or(Value::Null, Value::int)),
        ])
    }

    #[test]
    fn desired_size_is_not_fought_after_creation() {
        // Creation: configured value, else min_size.
        assert_eq!(
            plan_desired(&Value::Null, &sizes(1, 3, None), &sizes(1, 3, None)),
            Value::int(1)
        );
        assert_eq!(
            plan_desired(&Value::Null, &sizes(1, 3, Some(2)), &sizes(1, 3, Some(2))),
            Value::int(2)
        );
        // Afterwards: prior wins over a changed configuration.
        let prior = sizes(1, 3, Some(2));
        assert_eq!(
            plan_desired(&prior, &sizes(1, 3, Some(3)), &sizes(1, 3, Some(3))),
            Value::int(2)
        );
        // New bounds that exclude the prior size: config if it fits, else clamp.
        assert_eq!(
            plan_desired(&prior, &sizes(3, 5, Some(4)), &sizes(3, 5, Some(4))),
            Value::int(4)
        );
        assert_eq!(
            plan_desired(&prior, &sizes(3, 5, None), &sizes(3, 5, None)),
            Value::int(3)
        );
        assert_eq!(
            plan_desired(&prior, &sizes(0, 1, None), &sizes(0, 1, None)),
            Value::int(1)
        );
    }

    #[test]
    fn default_labels_and_id_are_planned() {
        let cfg = obj(&[
            ("cluster_name", Value::string("c")),
            ("name", Value::string("gpu")),
            ("labels", Value::Null),
            ("min_size", Value::int(1)),
            ("max_size", Value::int(1)),
        ]);
        let mut planned = cfg.clone();
        let mut d = Diagnostics::new();
        GpuNodePool.modify_plan(&Value::Null, &mut planned, &cfg, &mut d);
        assert_eq!(planned.get("id"), &Value::string("c:gpu"));
        assert_eq!(
            planned.get("labels").as_string_map().get(POOL_LABEL),
            Some(&"gpu".to_string())
        );
        assert_eq!(planned.get("desired_size"), &Value::int(1));
    }

    #[test]
    fn taint_diff_by_key_and_effect() {
        let old = Value::List(vec![
            taint_value("a", Some("1"), "NO_SCHEDULE"),
            taint_value("b", None, "NO_EXECUTE"),
        ]);
        let new = Value::List(vec![
            taint_value("a", Some("2"), "NO_SCHEDULE"),
            taint_value("c", None, "NO_EXECUTE"),
        ]);
        let (rm, add) = taint_diff(&old, &new);
        assert_eq!(rm, vec![("b".into(), None, "NO_EXECUTE".into())]);
        assert_eq!(add.len(), 2);
    }

    #[test]
    fn taints_read_in_prior_order() {
        let aws = vec![
            Taint::builder()
                .key("b")
                .effect(TaintEffect::NoExecute)
                .build(),
            Taint::builder()
                .key("a")
                .value("1")
                .effect(TaintEffect::NoSchedule)
                .build(),
            Taint::builder()
                .key("z")
                .effect(TaintEffect::NoSchedule)
                .build(),
        ];
        let prior = Value::List(vec![
            taint_value("a", Some("1"), "NO_SCHEDULE"),
            taint_value("b", None, "NO_EXECUTE"),
        ]);
        let v = taints_value(&aws, &prior);
        let keys: Vec<_> = taint_triples(&v).into_iter().map(|t| t.0).collect();
        assert_eq!(keys, vec!["a", "b", "z"]);
    }

    #[test]
    fn observe_keeps_desired_size_from_state() {
        let ng = Nodegroup::builder()
            .cluster_name("c")
            .nodegroup_name("gpu")
            .scaling_config(scaling(1, 5, 4))
            .build();
        let s = observe(&ng, &sizes(1, 3, Some(2)));
        assert_eq!(s.get("desired_size"), &Value::int(2));
        assert_eq!(s.get("max_size"), &Value::int(5));
        // After an import there is no prior size: take AWS's.
        let s = observe(&ng, &Value::Null);
        assert_eq!(s.get("desired_size"), &Value::int(4));
        assert_eq!(s.get("id"), &Value::string("c:gpu"));
    }

    #[test]
    fn import_id_is_cluster_colon_pool() {
        let v = GpuNodePool.import_state("agentplane:gpu").unwrap();
        assert_eq!(v.get("cluster_name"), &Value::string("agentplane"));
        assert_eq!(v.get("name"), &Value::string("gpu"));
        for bad in ["gpu", ":gpu", "agentplane:", "a:b:c", "a b:c"] {
            let e = GpuNodePool.import_state(bad).unwrap_err();
            assert!(
                e.to_string().contains("<cluster_name>:<node_pool_name>"),
                "{bad}: {e}"
            );
        }
    }
}
