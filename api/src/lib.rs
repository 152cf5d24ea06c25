//! agentplane's shared types: the CRDs (`AgentTask`, `EdgeDevice`, `AgentPolicy`, `AgentApproval`), the signed-intent
//! envelope and its payload, and the task phase machine. No I/O lives here.

pub mod approval;
pub mod device;
pub mod envelope;
pub mod intent;
pub mod phase;
pub mod policy;
pub mod step;
pub mod task;
pub mod wire;

pub use approval::{AgentApproval, AgentApprovalSpec};
pub use device::{EdgeDevice, EdgeDeviceSpec, EdgeDeviceStatus, KeyAlgorithm, PublicKey};
pub use envelope::{
    DeviceKey, Envelope, EnvelopeError, EnvelopeSignature, INTENT_PAYLOAD_TYPE, VerifiedIntent,
};
pub use intent::{Consent, Intent, IntentPayload, PrivacyLevel, RequiredResources};
pub use phase::TaskPhase;
pub use policy::{AgentPolicy, AgentPolicySpec};
pub use step::{AgentTaskStep, AgentTaskStepSpec};
pub use task::{AgentTask, AgentTaskSpec, AgentTaskStatus};

/// The API group of every agentplane CRD.
pub const GROUP: &str = "agentplane.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CustomResourceDefinition agentplane installs, in a stable order.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt as _;
    vec![
        AgentTask::crd(),
        EdgeDevice::crd(),
        AgentPolicy::crd(),
        AgentApproval::crd(),
        AgentTaskStep::crd(),
    ]
}
