"""The API server and `regmirror render` give the same verdict on every RegistryMirror.

hypothesis generates RegistryMirror documents, most of them hostile (upper case, dots and
underscores in names, ports 0..99999, IPv6, userinfo, unicode and whitespace of every class,
Docker Hub aliases in any case, odd quantities, durations, tolerations, clusterIPs, images,
proxies). Each one goes to the real API server as a server-side dry-run create with strict field
validation (what `kubectl create` sends), and through what `regmirror render -f` runs on a YAML
file. Admit or refuse, both must agree. Any disagreement hypothesis ever found is kept below as
an @example, so it is replayed on every run.

Runtime is bounded by the profile (REGMIRROR_ADMISSION_PROFILE): `ci` (the default when CI is
set) replays the same 500 examples, `default` draws 500 new ones, `thorough` 3000; 500 dry runs
take about 5 s on a local API server.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, reject, settings
from hypothesis import strategies as st

from harness import LocalCluster
from harness.cluster import ApiError
from harness.operator import CRD_FILE
from regmirror import constants as c
from regmirror.models import admission_verdict
from regmirror.offline import load_documents

# Profiles of this test only (loading one globally would change every other hypothesis test):
# CI replays the same 150 examples on every run (about 2-4 minutes of dry-run creates); a developer's run draws 500 new
# ones each time, and REGMIRROR_ADMISSION_PROFILE=thorough 3000.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("admission-ci", max_examples=150, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("admission-default", max_examples=500, **_COMMON)
settings.register_profile("admission-thorough", max_examples=3000, **_COMMON)
PROFILE = os.environ.get("REGMIRROR_ADMISSION_PROFILE") or ("ci" if os.environ.get("CI") else "default")

DRY_RUN_CREATE = f"/apis/{c.GROUP}/{c.VERSION}/{c.PLURAL}?dryRun=All&fieldValidation=Strict"


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> Iterator[LocalCluster]:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{c.CRD_NAME}", "--timeout=60s")
    yield cluster  # dry runs leave nothing behind


def as_kubectl_sends(value: Any) -> Any:
    """The document as kubectl sends it: Go's JSON encoder writes a float that is a whole number (YAML 1.0) as 1."""
    if isinstance(value, dict):
        return {k: as_kubectl_sends(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_kubectl_sends(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def server_verdict(cluster: LocalCluster, doc: dict[str, Any]) -> str | None:
    """None when the API server admits the document (sent as kubectl would send it), else its error."""
    try:
        cluster.api("POST", DRY_RUN_CREATE, as_kubectl_sends(doc))
    except ApiError as exc:
        if exc.status == 409:
            reject()  # a mirror of that name exists right now (another test): no verdict on validity
        if exc.status not in (400, 422):
            raise
        return exc.body
    return None


def render_verdict(doc: dict[str, Any]) -> str | None:
    """What `regmirror render -f` decides for the document written to a YAML file."""
    text = yaml.safe_dump(doc, allow_unicode=False)
    [loaded] = load_documents(text)
    assert loaded == doc, "the YAML round trip changed the document"
    return admission_verdict(loaded)


# ------------------------------------------------------------------ building blocks

# Whitespace and look-alikes of every class: ASCII, the C1 NEL, no-break and typographic spaces,
# line/paragraph separators, zero-width and BOM (Python's str.isspace and re's \s disagree with RE2
# on most of these), and Python-only whitespace \x1c-\x1f.
WHITESPACE = [" ", "\t", "\n", "\r", "\v", "\f", "\x1c", "\x1f", "\x85", "\xa0", "\u1680", "\u2000", "\u2007", "\u200b", "\u2028"]
WHITESPACE += ["\u2029", "\u202f", "\u205f", "\u3000", "\ufeff", "\u180e"]
UNICODE = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)
LOWER = string.ascii_lowercase + string.digits


def spiced(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly the base, sometimes with whitespace or unicode before, inside or after it."""
    noise = st.one_of(st.sampled_from(WHITESPACE), UNICODE)

    def splice(value: str, extra: str, where: int) -> str:
        at = where % (len(value) + 1)
        return value[:at] + extra + value[at:]

    return st.one_of(base, base, base, st.builds(splice, base, noise, st.integers(0, 300)))


dns_label = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")
hostnames = st.one_of(
    st.builds(".".join, st.lists(dns_label, min_size=1, max_size=3)),
    st.sampled_from(["docker.io", "Docker.IO", "registry-1.docker.io", "INDEX.docker.io", "quay.io", "localhost", "a..b", "-a.io"]),
    st.builds(".".join, st.lists(st.integers(0, 999).map(str), min_size=4, max_size=4)),
    st.sampled_from(["[fd00::1]", "a" * 64 + ".io", ".".join(["a" * 63] * 4)]),
    UNICODE,
)
ports = st.one_of(st.none(), st.integers(0, 99999).map(str), st.sampled_from(["", "080", "65535", "65536", "+80", "8o"]))


def with_port(host: str, port: str | None) -> str:
    return host if port is None else f"{host}:{port}"


registry_hosts = spiced(st.builds(with_port, hostnames, ports))
url_paths = st.one_of(
    st.just(""), st.sampled_from(["/", "/v2", "/a/b/", "/%20", "/%zz", "/?q=1", "/#f", "/a b"]), UNICODE.map(lambda t: "/" + t)
)
userinfo = st.one_of(st.just(""), st.just(""), st.sampled_from(["bob@", "bob:pw@", "@"]))
urls = spiced(
    st.builds(
        lambda scheme, user, host, port, path: f"{scheme}{user}{with_port(host, port)}{path}",
        st.sampled_from(["https://", "http://", "HTTPS://", "ftp://", "", "https:/"]),
        userinfo,
        hostnames,
        ports,
        url_paths,
    )
)
host_lists = st.lists(registry_hosts, max_size=5)
quantity_numbers = st.one_of(
    st.integers(0, 10**6).map(str),
    st.decimals(min_value=0, max_value=10**4, places=3, allow_nan=False).map(str),
    st.sampled_from(["0", "0.0000000001", "0.0000000002", "1e3", "1.5.2", "-1", "+1", ".5", "1.", "99999999999999999999999"]),
)
quantities = spiced(
    st.builds(str.__add__, quantity_numbers, st.sampled_from(["", "m", "k", "M", "G", "Ki", "Mi", "Gi", "Ei", "E", "u", "n", "KB", "gi"]))
)
resource_names = st.sampled_from(["cpu", "memory", "ephemeral-storage", "gpu", "hugepages-2Mi", "nvidia.com/gpu", "Memory"])
resource_maps = st.dictionaries(resource_names, quantities, max_size=3)
duration_parts = st.builds(
    str.__add__,
    st.one_of(st.integers(0, 10**6).map(str), st.sampled_from(["1.5", "0.000000001", "2562047", "9223372036854775807", "87600", ".5"])),
    st.sampled_from(["h", "m", "s", "ms", "us", "µs", "ns", "d", ""]),
)
durations = spiced(
    st.one_of(st.builds("".join, st.lists(duration_parts, min_size=1, max_size=3)), st.sampled_from(["0", "87600h", "87600h1ns"]))
)
label_keys = spiced(
    st.one_of(
        st.from_regex(r"\A[a-z]([-a-z0-9.]{0,10}[a-z0-9])?\Z"),
        st.sampled_from(["kubernetes.io/hostname", "example.com/key", "a/b/c", "/x", "x/", "A_b.C", "-x", "x" * 64, "p" * 254 + "/x"]),
    )
)
label_values = spiced(st.one_of(st.from_regex(r"\A([A-Za-z0-9][-A-Za-z0-9_.]{0,10})?\Z"), st.sampled_from(["", "a b", "-a", "x" * 64])))
tolerations = st.fixed_dictionaries(
    {},
    optional={
        "key": label_keys,
        "operator": st.sampled_from(["Exists", "Equal", "Lt", "exists"]),
        "value": label_values,
        "effect": st.sampled_from(["NoSchedule", "PreferNoSchedule", "NoExecute", "NoAdmit", ""]),
        "tolerationSeconds": st.one_of(st.integers(-10, 2**31 + 10), st.sampled_from(["5", 1.0, 1.5, True])),
    },
)
ipv4 = st.builds(lambda parts: ".".join(parts), st.lists(st.integers(0, 999).map(str), min_size=4, max_size=4))
cluster_ips = spiced(
    st.one_of(
        ipv4,
        st.ip_addresses().map(str),
        st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
        st.sampled_from(
            ["010.96.0.1", "::ffff:10.96.0.1", "fe80::1%eth0", "1:2:3", "::", "0.0.0.0", "127.0.0.1", "None", "", "fd00::1/64"]
        ),
    )
)
images = spiced(
    st.one_of(
        st.just("docker.io/library/registry:3.0.0"),
        st.builds(
            lambda registry, path, tag, digest: f"{registry}{path}{tag}{digest}",
            st.one_of(st.just(""), st.builds(lambda h, p: with_port(h, p) + "/", hostnames, ports)),
            st.sampled_from(["registry", "library/registry", "Team/registry", "a.b_c/x", "x__y", "x___y", "a" * 240, "0" * 64]),
            st.sampled_from(["", ":3.0.0", ":latest", ":-bad", ":" + "t" * 129]),
            st.sampled_from(["", "@sha256:" + "a" * 64, "@sha256:" + "A" * 64, "@sha256:abc", "@md5:" + "a" * 32, "@sha512:" + "b" * 128]),
        ),
    )
)
proxy_urls = spiced(
    st.builds(
        lambda scheme, user, host, port, tail: f"{scheme}{user}{with_port(host, port)}{tail}",
        st.sampled_from(["http://", "https://", "socks5://", "socks5h://", ""]),
        userinfo,
        hostnames,
        ports,
        st.sampled_from(["", "/", "/path"]),
    )
)
no_proxy_entries = st.one_of(
    hostnames, st.sampled_from(["*", ".cluster.local", "*.corp.example", "10.0.0.0/8", "fd00::/8", "[fd00::1]:80", ""])
)
no_proxies = spiced(
    st.builds(
        lambda entries, sep: sep.join(entries),
        st.lists(no_proxy_entries, min_size=1, max_size=4),
        st.sampled_from([",", ", ", " ,", ",\t"]),
    )
)
selector_requirements = st.fixed_dictionaries(
    {"key": label_keys, "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "in"])},
    optional={"values": st.lists(label_values, max_size=3)},
)
label_selectors = st.fixed_dictionaries(
    {},
    optional={
        "matchLabels": st.dictionaries(label_keys, label_values, max_size=3),
        "matchExpressions": st.lists(selector_requirements, max_size=2),
    },
)
node_requirements = st.fixed_dictionaries(
    {"key": label_keys, "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"])},
    optional={"values": st.lists(st.one_of(label_values, st.integers(0, 10**20).map(str)), max_size=2)},
)
affinities = st.fixed_dictionaries(
    {},
    optional={
        "nodeAffinity": st.fixed_dictionaries(
            {},
            optional={
                "requiredDuringSchedulingIgnoredDuringExecution": st.fixed_dictionaries(
                    {
                        "nodeSelectorTerms": st.lists(
                            st.fixed_dictionaries({}, optional={"matchExpressions": st.lists(node_requirements, max_size=2)}), max_size=2
                        )
                    }
                ),
                "preferredDuringSchedulingIgnoredDuringExecution": st.lists(
                    st.fixed_dictionaries(
                        {
                            "weight": st.integers(-1, 101),
                            "preference": st.fixed_dictionaries({}, optional={"matchExpressions": st.lists(node_requirements, max_size=1)}),
                        }
                    ),
                    max_size=2,
                ),
            },
        ),
        "podAntiAffinity": st.fixed_dictionaries(
            {},
            optional={
                "requiredDuringSchedulingIgnoredDuringExecution": st.lists(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "topologyKey": label_keys,
                            "labelSelector": label_selectors,
                            "namespaces": st.lists(spiced(dns_label), max_size=2),
                        },
                    ),
                    max_size=2,
                )
            },
        ),
    },
)
names = spiced(
    st.one_of(
        st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?\Z"),
        st.text(alphabet="abXY09-_.", min_size=1, max_size=64),
        st.sampled_from(
            ["Hub", "hub_1", "-hub", "hub-", "a.b", "a" * 48, "a" * 49, "a" * 63, "a" * 64, "hüb", "\uff48\uff55\uff42", ".", "..", "a/b"]
        ),
        UNICODE,
    )
)
cidrs = spiced(
    st.one_of(
        st.sampled_from(
            ["10.0.0.0/8", "10.0.0.1/8", "10.0.0.0/08", "010.0.0.0/8", "10.0.0.0/33", "0.0.0.0/0", "fd00:10::/64", "FD00:10::/64"]
        ),
        st.sampled_from(["fd00:10:0::/64", "::ffff:10.0.0.0/104", "::/0", "10.0.0.0", "fe80::/10%eth0", "1.2.3.4/32", "::1.2.3.4/128"]),
        st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 40)).map(lambda t: f"{t[0]}.{t[1]}.0.0/{t[2]}"),
    )
)
integers_as_sent = st.one_of(st.integers(-2, 25), st.sampled_from(["1", 1.0, 2.5, True, None]))
secret_keys = spiced(st.one_of(st.from_regex(r"\A[-._a-zA-Z0-9]{1,12}\Z"), st.sampled_from([".", "..", "..x", "a/b", "k" * 254])))

# Each generated document is a valid mirror with one to three fields replaced by a value drawn
# from that field's strategy (valid and hostile values mixed), so that a refusal is about the
# field under test rather than about a name that was already wrong.
FIELDS: dict[tuple[str, ...], st.SearchStrategy[Any]] = {
    ("metadata", "name"): names,
    ("spec", "upstream", "url"): urls,
    ("spec", "upstream", "hosts"): host_lists,
    ("spec", "upstream", "credentialsSecretRef"): st.fixed_dictionaries(
        {"name": spiced(dns_label)}, optional={"usernameKey": secret_keys, "passwordKey": secret_keys}
    ),
    ("spec", "upstream", "tls"): st.fixed_dictionaries(
        {"caSecretRef": st.fixed_dictionaries({"name": spiced(dns_label), "key": secret_keys})}
    ),
    ("spec", "replicas"): integers_as_sent,
    ("spec", "image"): images,
    ("spec", "storage"): st.fixed_dictionaries(
        {},
        optional={
            "size": quantities,
            "ephemeral": st.sampled_from([True, False, "yes", 1]),
            "accessModes": st.lists(st.sampled_from(["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "RWO"]), max_size=3),
            "storageClassName": spiced(st.one_of(st.just(""), dns_label, st.just("Fast SSD"))),
            "s3": st.fixed_dictionaries(
                {"bucket": spiced(st.one_of(dns_label, st.sampled_from(["ab", "Cache", "a" * 64, "my.bucket"])))},
                optional={
                    "endpoint": urls,
                    "region": spiced(st.sampled_from(["us-east-1", "EU", "x" * 33])),
                    "rootDirectory": spiced(st.sampled_from(["", "/", "regmirror/hub", "/a//b", "a b"])),
                    "credentialsSecretRef": st.fixed_dictionaries({"name": spiced(dns_label)}, optional={"accessKeyKey": secret_keys}),
                },
            ),
        },
    ),
    ("spec", "cache", "ttl"): durations,
    ("spec", "cache"): st.fixed_dictionaries(
        {},
        optional={
            "maxSize": quantities,
            "highWatermarkPercent": st.one_of(st.integers(0, 101), st.just("95")),
            "lowWatermarkPercent": st.integers(0, 101),
            "tagFreshness": durations,
        },
    ),
    ("spec", "prewarm"): st.lists(
        st.fixed_dictionaries(
            {"image": images},
            optional={
                "platforms": st.lists(
                    spiced(st.sampled_from(["linux/amd64", "linux/arm64/v8", "Linux/amd64", "linux", "linux/"])), max_size=3
                )
            },
        ),
        max_size=3,
    ),
    ("spec", "resources"): st.fixed_dictionaries({}, optional={"requests": resource_maps, "limits": resource_maps}),
    ("spec", "tolerations"): st.lists(tolerations, max_size=3),
    ("spec", "nodeSelector"): st.dictionaries(label_keys, label_values, max_size=3),
    ("spec", "affinity"): affinities,
    ("spec", "priorityClassName"): spiced(st.one_of(dns_label, st.sampled_from(["High", "system-node-critical", "a_b"]))),
    ("spec", "proxy"): st.fixed_dictionaries({}, optional={"httpProxy": proxy_urls, "httpsProxy": proxy_urls, "noProxy": no_proxies}),
    ("spec", "service"): st.fixed_dictionaries(
        {},
        optional={
            "port": st.one_of(st.integers(0, 70000), st.sampled_from([5001, "5000"])),
            "clusterIP": cluster_ips,
            "tls": st.fixed_dictionaries({"secretName": spiced(dns_label)}),
        },
    ),
    ("spec", "service", "clusterIP"): cluster_ips,
    ("spec", "service", "type"): st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer", "External", "nodeport"]),
    ("spec", "service", "nodePort"): st.one_of(st.integers(-1, 70000), st.just("30080")),
    ("spec", "service", "loadBalancerSourceRanges"): st.lists(cidrs, max_size=3),
    ("spec", "access"): st.fixed_dictionaries(
        {},
        optional={
            "policy": st.sampled_from(["Open", "Restricted", "Restricted", "open", "Private"]),
            "clients": st.lists(st.fixed_dictionaries({"name": spiced(dns_label)}), max_size=3),
            "rotateEvery": st.one_of(durations, st.sampled_from(["1h", "59m", "0", "720h"])),
            "networkPolicy": st.fixed_dictionaries(
                {},
                optional={
                    "enabled": st.sampled_from([True, False, "true"]),
                    "nodeSources": st.lists(cidrs, max_size=3),
                    "from": st.lists(
                        st.fixed_dictionaries(
                            {}, optional={"cidr": cidrs, "namespaceSelector": label_selectors, "podSelector": label_selectors}
                        ),
                        max_size=2,
                    ),
                },
            ),
        },
    ),
    ("spec", "nodeConfig"): st.fixed_dictionaries(
        {},
        optional={
            "enabled": st.sampled_from([True, False, "true"]),
            "fallback": st.sampled_from(["AllowUpstream", "NeverContactUpstream", "NeverContactUpstream", "never"]),
            "capabilities": st.lists(st.sampled_from(["pull", "resolve", "push"]), max_size=3),
            "runtimes": st.lists(st.sampled_from(["containerd", "crio", "docker"]), max_size=2),
            "priority": integers_as_sent,
            "nodeSelector": label_selectors,
        },
    ),
    ("spec", "nodeConfig", "fallback"): st.just("NeverContactUpstream"),
    ("metadata", "labels"): st.dictionaries(label_keys, label_values, max_size=2),
    ("spec", "upstreem"): st.just({}),  # an unknown field: strict field validation refuses it
}


def with_fields(changes: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "metadata": {"name": "prop"},
        "spec": {"upstream": {"url": "https://registry-1.docker.io"}},
    }
    for path, value in changes:
        node = doc
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return doc


field_changes = st.sampled_from(sorted(FIELDS)).flatmap(lambda path: st.tuples(st.just(path), FIELDS[path]))
documents = st.lists(field_changes, min_size=1, max_size=3).map(with_fields)


def mirror(name: str = "hub", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"upstream": {"url": "https://registry-1.docker.io"}, **spec}
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name}, "spec": body}


@settings(settings.get_profile(f"admission-{PROFILE}"))
@given(doc=documents)
# The issue's cases, and every disagreement a search has found: replayed on every run.
@example(doc=mirror("hub.example"))
@example(doc=mirror("Hub"))
@example(doc=mirror("hub_1"))
@example(doc=mirror("-hub"))
@example(doc=mirror(upstream={"url": "https://registry.example:99999"}))
@example(doc=mirror(upstream={"url": "https://mirror.gcr.io", "hosts": ["registry-1.docker.io", "docker.io"]}))
@example(doc=mirror(upstream={"url": "https://mirror.gcr.io", "hosts": ["Docker.io", "index.docker.io"]}))
@example(doc=mirror(upstream={"url": "https://quay.io/v2\x85"}))  # NEL: Python's \s, not RE2's
@example(doc=mirror(upstream={"url": "https://quay.io/v2\u00a0"}))
@example(doc=mirror(upstream={"url": "https://quay.io\n"}))
@example(doc=mirror(resources={"requests": {"memory": "1Gi"}}))
@example(doc=mirror(resources={"requests": {"cpu": "0.0000000002"}, "limits": {"cpu": "0.0000000001"}}))
@example(doc=mirror(tolerations=[{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]))
@example(doc=mirror(service={"clusterIP": "999.1.1.1"}))
@example(doc=mirror(service={"clusterIP": "1:2:3"}))
@example(doc=mirror(service={"clusterIP": "::ffff:10.96.0.1"}))
@example(doc=mirror(nodeConfig={"fallback": "NeverContactUpstream"}))
@example(doc=mirror(nodeConfig={"fallback": "NeverContactUpstream"}, image="registry.corp.example/registry:3"))
@example(doc=mirror(cache={"ttl": "2562047h47m16.854775807s"}))
@example(doc=mirror(cache={"ttl": "87600h0.000000001s"}))
@example(doc=mirror(replicas=1.0))
@example(doc=mirror(replicas="1"))
@example(doc=mirror(replicas=None, image=None))
@example(doc=mirror(image="a.b_c/registry:3"))
@example(doc=mirror(nodeConfig={"capabilities": ["pull", "pull"]}))  # found: set lists refuse duplicates
@example(doc=mirror(access={"clients": [{"name": "ci"}, {"name": "ci"}]}))
@example(doc=mirror(service={"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.1/8"]}))
@example(
    doc=mirror(
        upstream={"url": "https://quay.io", "credentialsSecretRef": {"name": "q"}}, service={"type": "NodePort"}, access={"policy": "Open"}
    )
)
@example(doc=mirror(access={"networkPolicy": {"from": [{}]}}))
def test_api_server_and_render_agree(api: LocalCluster, doc: dict[str, Any]) -> None:
    offline = render_verdict(doc)
    server = server_verdict(api, doc)
    assert (offline is None) == (server is None), (
        f"disagreement on {json.dumps(doc)}\n  regmirror render: {offline or 'admitted'}\n  API server:       {server or 'admitted'}"
    )
