"""Resource attributes traces take from the platform's environment (one table, read by
``tracing`` and by its OpenTelemetry side ``_otel``, which must not import each other)."""

from __future__ import annotations

# Resource attributes from the platform's environment, where present. Railway sets its
# variables itself; deploy/kubernetes/deployment.yaml sets the K8S_* ones (downward API).
PLATFORM_RESOURCE = (
    ("RAILWAY_SERVICE_NAME", "railway.service.name"),
    ("RAILWAY_SERVICE_ID", "railway.service.id"),
    ("RAILWAY_REPLICA_ID", "railway.replica.id"),
    ("RAILWAY_REPLICA_REGION", "cloud.region"),
    ("RAILWAY_DEPLOYMENT_ID", "deployment.id"),
    ("RAILWAY_ENVIRONMENT_NAME", "deployment.environment.name"),
    ("RAILWAY_PROJECT_NAME", "railway.project.name"),
    ("RAILWAY_GIT_COMMIT_SHA", "vcs.ref.head.revision"),
    ("RAILWAY_GIT_BRANCH", "vcs.ref.head.name"),
    ("K8S_POD_NAME", "k8s.pod.name"),
    ("K8S_POD_UID", "k8s.pod.uid"),
    ("K8S_NAMESPACE_NAME", "k8s.namespace.name"),
    ("K8S_NODE_NAME", "k8s.node.name"),
    ("K8S_CONTAINER_NAME", "k8s.container.name"),
    ("K8S_DEPLOYMENT_NAME", "k8s.deployment.name"),
)
