//! `agentplane_cluster`: an EKS cluster (control plane) for the agentplane runtime, with
//! envelope encryption of Kubernetes secrets under a KMS key.
//!
//! Create and every update wait until the cluster is ACTIVE again; destroy waits until it is
//! gone, so dependent resources (node pools, the runtime) see a usable cluster.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_eks::Client;
use aws_sdk_eks::types::{
    Cluster as EksCluster, ClusterStatus, EncryptionConfig, Provider, VpcConfigRequest,
};

use super::{label, tag_diff, tags_value};
use crate::aws;
use crate::config::ProviderData;
use crate::eks::{
    self, DEFAULT_WAIT_SECONDS, Progress, WAIT_SECONDS, fill_unknown, optional_set, same_strings,
    string_set, strings, typed,
};
use crate::framework::{
    AttrPath, Attribute, Block, Diagnostics, Resource, Schema, Type, Validator, Value,
};

pub const TYPE: &str = "agentplane_cluster";

pub struct Cluster;

/// EKS cluster names: up to 100 characters.
const MAX_NAME: usize = 100;
/// The Kubernetes resources EKS can envelope-encrypt; only secrets today.
const ENCRYPTED_RESOURCES: &str = "secrets";

fn schema_block() -> Block {
    Block::new("An Amazon EKS cluster for the agentplane runtime. Kubernetes secrets are envelope-encrypted with `encryption_kms_key_arn` when set. Create and updates wait until the cluster is `ACTIVE`; destroy waits until it is deleted.")
        .attr(Attribute::string("id").computed().describe("The cluster name."))
        .attr(Attribute::string("name").required().force_new().describe("Cluster name: 1-100 letters, digits, `-` and `_`, starting with a letter or digit. Changing it replaces the cluster."))
        .attr(Attribute::string("version").optional().computed().describe("Kubernetes minor version such as `1.33`. Unset = the EKS default at creation. Raising it upgrades the control plane in place (one minor version at a time); EKS cannot downgrade."))
        .attr(Attribute::string("role_arn").required().force_new().describe("ARN of the IAM role the EKS control plane assumes. Changing it replaces the cluster."))
        .attr(typed("subnet_ids", Type::set(Type::String)).required().force_new().describe("Subnets (at least two, in different availability zones) for the control plane's network interfaces. Changing them replaces the cluster."))
        .attr(typed("security_group_ids", Type::set(Type::String)).optional().describe("Extra security groups for the control plane's network interfaces (EKS always adds its cluster security group). Updated in place."))
        .attr(Attribute::bool("endpoint_public_access").default(Value::Bool(true)).describe("Whether the Kubernetes API endpoint is reachable from the internet. Default true. Updated in place."))
        .attr(Attribute::bool("endpoint_private_access").default(Value::Bool(false)).describe("Whether the Kubernetes API endpoint is reachable from inside the VPC. Default false. Updated in place."))
        .attr(typed("public_access_cidrs", Type::set(Type::String)).optional().computed().describe("CIDR blocks allowed to reach the public endpoint. Unset = what EKS chooses (`0.0.0.0/0`). Updated in place."))
        .attr(Attribute::string("encryption_kms_key_arn").optional().force_new().describe("ARN of a symmetric KMS key (e.g. `agentplane_kms_key.k.arn`) used to envelope-encrypt Kubernetes secrets. Changing it replaces the cluster."))
        .attr(Attribute::string_map("tags").optional().describe("Tags of the cluster. Updated in place."))
        .attr(
            Attribute::number("wait_timeout_seconds")
                .default(Value::int(DEFAULT_WAIT_SECONDS))
                .validate(Validator::IntRange(WAIT_SECONDS.0, WAIT_SECONDS.1))
                .describe("How long create, update and destroy wait for the cluster to become `ACTIVE` (or to disappear), in seconds. Default 1200."),
        )
        .attr(Attribute::string("arn").computed().describe("Cluster ARN."))
        .attr(Attribute::string("endpoint").computed().describe("URL of the Kubernetes API server."))
        .attr(Attribute::string("certificate_authority").computed().describe("Base64 PEM bundle of the cluster's certificate authority (the kubeconfig's `certificate-authority-data`)."))
        .attr(Attribute::string("oidc_issuer").computed().describe("OIDC issuer URL of the cluster (for IAM roles for service accounts)."))
        .attr(Attribute::string("status").computed().describe("Cluster status as last read (`ACTIVE` after a successful apply)."))
        .attr(Attribute::string("platform_version").computed().describe("EKS platform version (changes with upgrades)."))
        .attr(Attribute::string("created_at").computed().describe("Creation time, RFC 3339."))
}

fn what(v: &Value) -> String {
    label(TYPE, v.get("name").as_str())
}

/// `(major, minor)` of a Kubernetes version such as `1.33`.
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A CIDR block such as `203.0.113.0/24` (IPv4 or IPv6).
fn valid_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len <= 32,
        Ok(std::net::IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

/// Checks a cluster name (also used for `agentplane_gpu_node_pool.cluster_name`).
pub fn validate_name(name: &str, path: AttrPath, diags: &mut Diagnostics) {
    if !eks::valid_name(name, MAX_NAME) {
        diags.attr_error(
            path.clone(),
            "Invalid cluster name",
            format!("{path} {name:?}: EKS cluster names are 1-{MAX_NAME} letters, digits, '-' and '_', starting with a letter or digit."),
        );
    }
}

/// The state attributes that DescribeCluster reports, laid over `prior` (which supplies what
/// AWS does not report: `wait_timeout_seconds`, and the empty-vs-null form of optional
/// collections).
pub fn observe(cl: &EksCluster, prior: &Value) -> Value {
    let mut s = match prior {
        Value::Object(_) => prior.clone(),
        _ => Value::Object(BTreeMap::new()),
    };
    let name = cl
        .name()
        .or(prior.get("name").as_str())
        .unwrap_or_default()
        .to_string();
    s.set("id", Value::string(&name));
    s.set("name", Value::string(name));
    s.set("arn", Value::opt_string(cl.arn()));
    s.set("version", Value::opt_string(cl.version()));
    s.set("role_arn", Value::opt_string(cl.role_arn()));
    let vpc = cl.resources_vpc_config();
    s.set(
        "subnet_ids",
        string_set(vpc.map(|v| v.subnet_ids().to_vec()).unwrap_or_default()),
    );
    s.set(
        "security_group_ids",
        optional_set(
            vpc.map(|v| v.security_group_ids().to_vec())
                .unwrap_or_default(),
            prior.get("security_group_ids"),
        ),
    );
    s.set(
        "endpoint_public_access",
        Value::Bool(vpc.is_some_and(|v| v.endpoint_public_access())),
    );
    s.set(
        "endpoint_private_access",
        Value::Bool(vpc.is_some_and(|v| v.endpoint_private_access())),
    );
    s.set(
        "public_access_cidrs",
        optional_set(
            vpc.map(|v| v.public_access_cidrs().to_vec())
                .unwrap_or_default(),
            prior.get("public_access_cidrs"),
        ),
    );
    // EKS now encrypts all API data under the configured key and no longer reports which
    // resources a config covers in a meaningful way, so the first provider key is the key.
    let key = cl
        .encryption_config()
        .iter()
        .find_map(|e| e.provider())
        .and_then(|p| p.key_arn());
    s.set("encryption_kms_key_arn", Value::opt_string(key));
    s.set(
        "tags",
        tags_value(
            cl.tags()
                .map(|t| t.clone().into_iter().collect())
                .unwrap_or_default(),
            prior.get("tags"),
        ),
    );
    if s.get("wait_timeout_seconds").is_null() {
        s.set("wait_timeout_seconds", Value::int(DEFAULT_WAIT_SECONDS));
    }
    s.set("endpoint", Value::opt_string(cl.endpoint()));
    s.set(
        "certificate_authority",
        Value::opt_string(cl.certificate_authority().and_then(|c| c.data())),
    );
    s.set(
        "oidc_issuer",
        Value::opt_string(
            cl.identity()
                .and_then(|i| i.oidc())
                .and_then(|o| o.issuer()),
        ),
    );
    s.set(
        "status",
        Value::opt_string(cl.status().map(|st| st.as_str())),
    );
    s.set("platform_version", Value::opt_string(cl.platform_version()));
    s.set("created_at", eks::timestamp(cl.created_at()));
    s
}

/// DescribeCluster; `None` when the cluster does not exist.
async fn describe(c: &Client, name: &str, w: &str) -> Result<Option<EksCluster>, Diagnostics> {
    match c.describe_cluster().name(name).send().await {
        Ok(o) => Ok(o.cluster),
        Err(e) if eks::is_not_found(&e) => Ok(None),
        Err(e) => Err(aws::diag(&e, w, "eks:DescribeCluster")),
    }
}

fn health(cl: &EksCluster) -> String {
    let issues: Vec<String> = cl
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

/// Waits until the cluster is ACTIVE and returns it.
async fn wait_active(
    c: &Client,
    name: &str,
    planned: &Value,
    w: &str,
) -> Result<EksCluster, Diagnostics> {
    eks::wait_for(
        eks::wait_timeout(planned),
        w,
        "ACTIVE",
        &format!("The cluster exists in AWS: once it is ACTIVE, bring it under management with `terraform import <address> {name}` (or delete it in AWS) and apply again."),
        || async move {
            let Some(cl) = describe(c, name, w).await? else {
                return Err(Diagnostics::single(
                    format!("{w} disappeared"),
                    format!("EKS no longer knows cluster {name:?} while waiting for it to become ACTIVE."),
                ));
            };
            match cl.status() {
                Some(ClusterStatus::Active) => Ok(Progress::Done(cl)),
                Some(ClusterStatus::Failed) => Err(Diagnostics::single(
                    format!("{w} failed"),
                    format!("EKS reports cluster {name:?} as FAILED: {}", health(&cl)),
                )),
                Some(ClusterStatus::Deleting) => Err(Diagnostics::single(
                    format!("{w} is being deleted"),
                    format!("Cluster {name:?} is being deleted (by someone else) while waiting for it to become ACTIVE."),
                )),
                other => Ok(Progress::Waiting(
                    other.map_or("PENDING", |s| s.as_str()).to_string(),
                )),
            }
        },
    )
    .await
}

fn vpc_for_create(planned: &Value) -> VpcConfigRequest {
    let mut b = VpcConfigRequest::builder()
        .set_subnet_ids(Some(strings(planned.get("subnet_ids"))))
        .endpoint_public_access(
            planned
                .get("endpoint_public_access")
                .as_bool()
                .unwrap_or(true),
        )
        .endpoint_private_access(
            planned
                .get("endpoint_private_access")
                .as_bool()
                .unwrap_or(false),
        );
    let sgs = strings(planned.get("security_group_ids"));
    if !sgs.is_empty() {
        b = b.set_security_group_ids(Some(sgs));
    }
    let cidrs = strings(planned.get("public_access_cidrs"));
    if !cidrs.is_empty() {
        b = b.set_public_access_cidrs(Some(cidrs));
    }
    b.build()
}

#[async_trait]
impl Resource<ProviderData> for Cluster {
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
        if let Some(name) = config.get("name").as_str() {
            validate_name(name, AttrPath::attr("name"), diags);
        }
        if let Some(v) = config.get("version").as_str()
            && parse_version(v).is_none()
        {
            diags.attr_error(
                AttrPath::attr("version"),
                "Invalid Kubernetes version",
                format!("version {v:?} must be a Kubernetes minor version such as \"1.33\"."),
            );
        }
        if let Some(arn) = config.get("role_arn").as_str()
            && !eks::valid_role_arn(arn)
        {
            diags.attr_error(
                AttrPath::attr("role_arn"),
                "Invalid role ARN",
                format!(
                    "role_arn {arn:?} must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)."
                ),
            );
        }
        let subnets = config.get("subnet_ids");
        if subnets.is_wholly_known() && !subnets.is_null() && strings(subnets).len() < 2 {
            diags.attr_error(
                AttrPath::attr("subnet_ids"),
                "Too few subnets",
                "subnet_ids needs at least two subnets, in different availability zones: EKS places control plane interfaces in two zones.",
            );
        }
        if let Value::Set(cidrs) | Value::List(cidrs) = config.get("public_access_cidrs") {
            for c in cidrs.iter().filter_map(Value::as_str) {
                if !valid_cidr(c) {
                    diags.attr_error(
                        AttrPath::attr("public_access_cidrs"),
                        "Invalid CIDR block",
                        format!("public_access_cidrs entry {c:?} is not a CIDR block such as \"203.0.113.0/24\"."),
                    );
                }
            }
        }
        if config.get("endpoint_public_access").as_bool() == Some(false)
            && config.get("endpoint_private_access").as_bool() == Some(false)
        {
            diags.attr_error(
                AttrPath::attr("endpoint_private_access"),
                "No API endpoint left",
                "endpoint_public_access and endpoint_private_access cannot both be false: the cluster would have no reachable API endpoint.",
            );
        }
        if let Some(k) = config.get("encryption_kms_key_arn").as_str()
            && !(k.starts_with("arn:") && k.contains(":kms:"))
        {
            diags.attr_error(
                AttrPath::attr("encryption_kms_key_arn"),
                "Invalid KMS key ARN",
                format!("encryption_kms_key_arn {k:?} must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>); EKS does not accept bare key ids."),
            );
        }
    }

    fn modify_plan(
        &self,
        prior: &Value,
        planned: &mut Value,
        _config: &Value,
        diags: &mut Diagnostics,
    ) {
        // The id is the name, so it is known as soon as the name is.
        if let Some(n) = planned.get("name").as_str() {
            let n = n.to_string();
            planned.set("id", Value::String(n));
        }
        if prior.is_null() {
            return;
        }
        let (old, new) = (prior.get("version"), planned.get("version"));
        if let (Some(o), Some(n)) = (old.as_str(), new.as_str())
            && o != n
        {
            match (parse_version(o), parse_version(n)) {
                (Some(a), Some(b)) if b < a => diags.attr_error(
                    AttrPath::attr("version"),
                    "Kubernetes version cannot go down",
                    format!("version {n:?} is older than the cluster's {o:?}; EKS cannot downgrade a cluster. Restore {o:?}, or replace the cluster (e.g. `-replace`)."),
                ),
                // An upgrade gives a new platform version.
                _ => planned.set("platform_version", Value::UNKNOWN),
            }
        }
    }

    async fn create(&self, data: &ProviderData, planned: &Value) -> Result<Value, Diagnostics> {
        let c = data.eks().await;
        let w = what(planned);
        let name = planned.get("name").as_str().unwrap_or_default().to_string();
        let mut req = c
            .create_cluster()
            .name(&name)
            .role_arn(planned.get("role_arn").as_str().unwrap_or_default())
            .resources_vpc_config(vpc_for_create(planned));
        if let Some(v) = planned.get("version").as_str() {
            req = req.version(v);
        }
        if let Some(k) = planned.get("encryption_kms_key_arn").as_str() {
            // `resources` is deprecated (EKS now encrypts all API data under the key) but
            // EKS API versions and emulators that predate that still require `secrets`.
            #[allow(deprecated)]
            let resources = EncryptionConfig::builder().resources(ENCRYPTED_RESOURCES);
            req = req.encryption_config(
                resources
                    .provider(Provider::builder().key_arn(k).build())
                    .build(),
            );
        }
        let tags = planned.get("tags").as_string_map();
        if !tags.is_empty() {
            req = req.set_tags(Some(tags.into_iter().collect()));
        }
        req.send()
            .await
            .map_err(|e| aws::diag(&e, &w, "eks:CreateCluster"))?;
        tracing::info!(cluster = %name, "created EKS cluster; waiting for ACTIVE");
        let cl = wait_active(c, &name, planned, &w).await?;
        Ok(fill_unknown(planned, &observe(&cl, planned)))
    }

    async fn read(&self, data: &ProviderData, state: &Value) -> Result<Option<Value>, Diagnostics> {
        let c = data.eks().await;
        let w = what(state);
        let Some(name) = state.get("name").as_str().or(state.get("id").as_str()) else {
            return Ok(None);
        };
        match describe(c, name, &w).await? {
            Some(cl) => Ok(Some(observe(&cl, state))),
            None => {
                tracing::info!(cluster = %name, "cluster no longer exists");
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
        let name = prior.get("name").as_str().unwrap_or_default().to_string();
        let timeout = eks::wait_timeout(planned);

        if let Some(v) = planned.get("version").as_str()
            && prior.get("version").as_str() != Some(v)
        {
            let out = c
                .update_cluster_version()
                .name(&name)
                .version(v)
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "eks:UpdateClusterVersion"))?;
            eks::wait_update(c, &name, None, out.update(), timeout, &w).await?;
            wait_active(c, &name, planned, &w).await?;
        }

        // EKS accepts one kind of change per UpdateClusterConfig call: endpoint access first,
        // then the security groups.
        let cidrs = planned.get("public_access_cidrs");
        if prior.get("endpoint_public_access") != planned.get("endpoint_public_access")
            || prior.get("endpoint_private_access") != planned.get("endpoint_private_access")
            || (!cidrs.is_null() && !same_strings(prior.get("public_access_cidrs"), cidrs))
        {
            let mut vpc = VpcConfigRequest::builder()
                .endpoint_public_access(
                    planned
                        .get("endpoint_public_access")
                        .as_bool()
                        .unwrap_or(true),
                )
                .endpoint_private_access(
                    planned
                        .get("endpoint_private_access")
                        .as_bool()
                        .unwrap_or(false),
                );
            if !cidrs.is_null() {
                vpc = vpc.set_public_access_cidrs(Some(strings(cidrs)));
            }
            let out = c
                .update_cluster_config()
                .name(&name)
                .resources_vpc_config(vpc.build())
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "eks:UpdateClusterConfig"))?;
            eks::wait_update(c, &name, None, out.update(), timeout, &w).await?;
            wait_active(c, &name, planned, &w).await?;
        }
        if !same_strings(
            prior.get("security_group_ids"),
            planned.get("security_group_ids"),
        ) {
            let vpc = VpcConfigRequest::builder()
                .set_security_group_ids(Some(strings(planned.get("security_group_ids"))))
                .build();
            let out = c
                .update_cluster_config()
                .name(&name)
                .resources_vpc_config(vpc)
                .send()
                .await
                .map_err(|e| aws::diag(&e, &w, "eks:UpdateClusterConfig"))?;
            eks::wait_update(c, &name, None, out.update(), timeout, &w).await?;
            wait_active(c, &name, planned, &w).await?;
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
        match describe(c, &name, &w).await? {
            Some(cl) => Ok(fill_unknown(planned, &observe(&cl, planned))),
            None => Err(Diagnostics::single(
                format!("{w} disappeared"),
                format!("Cluster {name:?} no longer exists after the update."),
            )),
        }
    }

    async fn delete(&self, data: &ProviderData, state: &Value) -> Result<(), Diagnostics> {
        let c = data.eks().await;
        let w = what(state);
        let Some(name) = state.get("name").as_str() else {
            return Ok(());
        };
        match c.delete_cluster().name(name).send().await {
            Ok(_) => {}
            Err(e) if eks::is_not_found(&e) => return Ok(()),
            Err(e) if eks::is_in_use(&e) => {
                return Err(Diagnostics::single(
                    format!("{w} is still in use"),
                    format!(
                        "EKS refused to delete cluster {name:?} while node groups (or other attached resources) exist: {}\nDestroy its node pools first; Terraform does that by itself when they refer to this cluster (cluster_name = agentplane_cluster.<name>.name).",
                        aws_sdk_eks::error::DisplayErrorContext(&e)
                    ),
                ));
            }
            Err(e) => return Err(aws::diag(&e, &w, "eks:DeleteCluster")),
        }
        tracing::info!(cluster = %name, "deleting EKS cluster; waiting until it is gone");
        let w = &w;
        eks::wait_for(
            eks::wait_timeout(state),
            w,
            "deleted",
            "Deletion goes on in AWS; run destroy again to wait for it.",
            || async move {
                Ok(match describe(c, name, w).await? {
                    None => Progress::Done(()),
                    Some(cl) => Progress::Waiting(
                        cl.status().map_or("DELETING", |s| s.as_str()).to_string(),
                    ),
                })
            },
        )
        .await
    }

    fn import_state(&self, id: &str) -> Result<Value, Diagnostics> {
        if !eks::valid_name(id, MAX_NAME) {
            return Err(Diagnostics::single(
                "Invalid import ID",
                format!(
                    "{id:?} is not an EKS cluster name; import an agentplane_cluster by its name."
                ),
            ));
        }
        Ok(Value::Object(BTreeMap::from([
            ("id".to_string(), Value::string(id)),
            ("name".to_string(), Value::string(id)),
        ])))
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_eks::types::{Certificate, Identity, Oidc, VpcConfigResponse};

    use super::*;
    use crate::framework::codec::from_json;

    fn validate(j: serde_json::Value) -> Vec<String> {
        let r = Cluster;
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
            "name": "agentplane",
            "role_arn": "arn:aws:iam::123456789012:role/eks",
            "subnet_ids": ["subnet-a", "subnet-b"],
        })
    }

    fn with(k: &str, v: serde_json::Value) -> serde_json::Value {
        let mut j = ok();
        j[k] = v;
        j
    }

    #[test]
    fn validation_names_the_attribute() {
        assert!(validate(ok()).is_empty());
        assert_eq!(validate(with("name", "".into())), vec!["name"]);
        assert_eq!(validate(with("name", "bad name".into())), vec!["name"]);
        assert_eq!(validate(with("version", "latest".into())), vec!["version"]);
        assert_eq!(validate(with("role_arn", "eks".into())), vec!["role_arn"]);
        assert_eq!(
            validate(with("subnet_ids", serde_json::json!(["subnet-a"]))),
            vec!["subnet_ids"]
        );
        assert_eq!(
            validate(with(
                "public_access_cidrs",
                serde_json::json!(["10.0.0.0/33"])
            )),
            vec!["public_access_cidrs"]
        );
        assert_eq!(
            validate(with("encryption_kms_key_arn", "1234abcd".into())),
            vec!["encryption_kms_key_arn"]
        );
        let mut j = ok();
        j["endpoint_public_access"] = false.into();
        j["endpoint_private_access"] = false.into();
        assert_eq!(validate(j), vec!["endpoint_private_access"]);
        assert_eq!(
            validate(with("wait_timeout_seconds", 0.into())),
            vec!["wait_timeout_seconds"]
        );
    }

    #[test]
    fn cidrs() {
        assert!(valid_cidr("0.0.0.0/0"));
        assert!(valid_cidr("2001:db8::/32"));
        assert!(!valid_cidr("10.0.0.0"));
        assert!(!valid_cidr("10.0.0.0/40"));
    }

    fn obj(pairs: &[(&str, Value)]) -> Value {
        Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn downgrade_is_refused_and_upgrade_unknowns_platform_version() {
        let prior = obj(&[
            ("name", Value::string("c")),
            ("version", Value::string("1.32")),
            ("platform_version", Value::string("eks.9")),
        ]);
        let mut planned = prior.clone();
        planned.set("version", Value::string("1.33"));
        let mut d = Diagnostics::new();
        Cluster.modify_plan(&prior, &mut planned, &Value::Null, &mut d);
        assert!(d.is_empty());
        assert_eq!(planned.get("platform_version"), &Value::UNKNOWN);
        assert_eq!(planned.get("id"), &Value::string("c"));

        let mut planned = prior.clone();
        planned.set("version", Value::string("1.31"));
        Cluster.modify_plan(&prior, &mut planned, &Value::Null, &mut d);
        assert_eq!(d.0[0].path, Some(AttrPath::attr("version")));
    }

    #[test]
    fn observe_maps_describe_cluster() {
        let cl = EksCluster::builder()
            .name("c")
            .arn("arn:aws:eks:us-east-1:123456789012:cluster/c")
            .version("1.33")
            .status(ClusterStatus::Active)
            .endpoint("https://x.eks.amazonaws.com")
            .certificate_authority(Certificate::builder().data("Q0E=").build())
            .identity(
                Identity::builder()
                    .oidc(Oidc::builder().issuer("https://oidc/x").build())
                    .build(),
            )
            .resources_vpc_config(
                VpcConfigResponse::builder()
                    .subnet_ids("subnet-b")
                    .subnet_ids("subnet-a")
                    .endpoint_public_access(true)
                    .build(),
            )
            .encryption_config(
                EncryptionConfig::builder()
                    .provider(Provider::builder().key_arn("arn:aws:kms:k").build())
                    .build(),
            )
            .build();
        let prior = obj(&[
            ("name", Value::string("c")),
            ("wait_timeout_seconds", Value::int(60)),
            ("security_group_ids", Value::Set(vec![])),
        ]);
        let s = observe(&cl, &prior);
        assert_eq!(
            s.get("subnet_ids"),
            &Value::Set(vec![Value::string("subnet-a"), Value::string("subnet-b")])
        );
        assert_eq!(s.get("security_group_ids"), &Value::Set(vec![]));
        assert_eq!(s.get("public_access_cidrs"), &Value::Null);
        assert_eq!(s.get("endpoint_private_access"), &Value::Bool(false));
        assert_eq!(
            s.get("encryption_kms_key_arn"),
            &Value::string("arn:aws:kms:k")
        );
        assert_eq!(s.get("certificate_authority"), &Value::string("Q0E="));
        assert_eq!(s.get("oidc_issuer"), &Value::string("https://oidc/x"));
        assert_eq!(s.get("status"), &Value::string("ACTIVE"));
        assert_eq!(s.get("wait_timeout_seconds"), &Value::int(60));
        assert_eq!(s.get("tags"), &Value::Null);
    }

    #[test]
    fn import_needs_a_cluster_name() {
        let v = Cluster.import_state("agentplane").unwrap();
        assert_eq!(v.get("name"), &Value::string("agentplane"));
        assert!(Cluster.import_state("a:b").is_err());
        assert!(Cluster.import_state("").is_err());
    }
}
