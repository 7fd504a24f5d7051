//! Fleet measurements against `imn up` and five real agent processes with tags and
//! locations: selection like RIPE Atlas's, and a one-off measurement that completes at
//! its deadline when one agent stays offline.

use std::collections::BTreeSet;
use std::time::Duration;

use imn_tests::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn ids(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|a| {
            a.get("id")
                .unwrap_or(a)
                .as_str()
                .expect("an id")
                .to_string()
        })
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_and_a_one_off_measurement_with_an_agent_offline() {
    let up = Up::start(0, &[]).await;
    let fleet: [(&str, &str, &str, Option<&str>); 5] = [
        ("f1", "lte", "DE", Some("3320")),
        ("f2", "lte", "de", None),
        ("f3", "lab", "NL", Some("1136")),
        ("f4", "lte,lab", "NL", None),
        ("f5", "lab", "DE", None),
    ];
    let mut procs = Vec::new();
    for (id, tags, country, asn) in fleet {
        let mut flags = vec![
            "--heartbeat-ms",
            "500",
            "--tags",
            tags,
            "--country",
            country,
        ];
        if let Some(a) = asn {
            flags.extend(["--asn", a]);
        }
        procs.push(spawn_agent(
            &bin("imn-agent"),
            id,
            &up.broker_url(),
            &up.dir.path().join(id),
            &flags,
            up.dir.path(),
        ));
    }
    up.api.wait_alive(&["f1", "f2", "f3", "f4", "f5"], T).await;

    // Searchable metadata.
    let get = |q: &'static str| {
        let api = up.api.clone();
        async move {
            let r = api.get(&format!("/agents{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.body);
            ids(&r.body)
        }
    };
    assert_eq!(get("?tag=lte").await, set(&["f1", "f2", "f4"]));
    assert_eq!(get("?tag=lte,lab").await, set(&["f4"]));
    assert_eq!(get("?country=de").await, set(&["f1", "f2", "f5"]));
    assert_eq!(get("?country=DE&tag=lab").await, set(&["f5"]));
    assert_eq!(get("?asn=1136").await, set(&["f3"]));
    assert_eq!(get("?alive=true").await.len(), 5);
    let one = up.api.get("/agents?asn=3320").await;
    assert_eq!(one.body[0]["location"]["country"], "DE");
    assert_eq!(one.body[0]["location"]["asn"], 3320);
    assert_eq!(one.body[0]["arch"], std::env::consts::ARCH);

    // Selection for a measurement: by tag with a limit, by country.
    let create = |body: Value| {
        let api = up.api.clone();
        async move { api.post("/v1/measurements", &body.to_string(), &[]).await }
    };
    let r = create(json!({
        "module": "echo_module", "params": {"message": "lab"},
        "agents": {"tags": ["lab"], "limit": 2},
    }))
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let chosen = ids(&r.body["agents"]);
    assert_eq!(chosen.len(), 2);
    assert!(chosen.is_subset(&set(&["f3", "f4", "f5"])), "{chosen:?}");
    assert_eq!(
        r.headers["location"].to_str().unwrap(),
        format!("/v1/measurements/{}", r.body["id"].as_str().unwrap())
    );
    let r = create(json!({
        "module": "echo_module", "params": {"message": "de"},
        "agents": {"country": "DE"},
    }))
    .await;
    assert_eq!(ids(&r.body["agents"]), set(&["f1", "f2", "f5"]));
    // Nothing matches: 422 with the reason.
    let r = create(json!({
        "module": "echo_module", "params": {"message": "x"},
        "agents": {"country": "FR", "tags": ["lte"]},
    }))
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert_eq!(r.body["rule"], "no_match", "{}", r.body);
    assert!(r.body["message"].as_str().unwrap().contains("FR"));
    // Bad parameters are refused once, naming the field.
    let r = create(json!({
        "module": "echo_module", "params": {"message": 5}, "agents": {"all": true},
    }))
    .await;
    assert_eq!(
        (r.status, r.body["field"].as_str()),
        (422, Some("/message"))
    );

    // A one-off measurement to all five, f5 offline: 4 results, then complete at the
    // deadline with f5 expired.
    procs[4].kill9();
    up.api.wait_not_alive("f5", T).await;
    let r = create(json!({
        "module": "echo_module", "params": {"message": "fleet"},
        "agents": {"ids": ["f1", "f2", "f3", "f4", "f5"]},
        "deadline_s": 5, "description": "one offline",
    }))
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["agents"].as_array().unwrap().len(), 5);
    let path = r.headers["location"].to_str().unwrap().to_string();
    let m = wait_for("4 of 5 agents to report", T, || {
        let (api, path) = (up.api.clone(), path.clone());
        async move {
            let m = api.get(&path).await.body;
            (m["progress"]["reported"] == 4).then_some(m)
        }
    })
    .await;
    assert_eq!(m["state"], "running", "{m}");
    assert_eq!(
        m["progress"]["summary"], "4/5 agents reported, 1 pending: 1 offline",
        "{m}"
    );
    let started = std::time::Instant::now();
    let m = wait_for("the measurement to complete at its deadline", T, || {
        let (api, path) = (up.api.clone(), path.clone());
        async move {
            let m = api.get(&path).await.body;
            (m["state"] == "complete").then_some(m)
        }
    })
    .await;
    println!(
        "complete {:.1} s after 4/5 reported: {}",
        started.elapsed().as_secs_f64(),
        m["progress"]["summary"]
    );
    assert_eq!(m["progress"]["reported"], 4, "{m}");
    assert_eq!(m["progress"]["expired_or_cancelled"], 1, "{m}");
    assert_eq!(m["description"], "one offline");
    for a in m["agents"].as_array().unwrap() {
        if a["agent_id"] == "f5" {
            assert_eq!(a["state"], "expired", "{a}");
            assert!(a["result"].is_null());
        } else {
            assert_eq!(a["state"], "succeeded", "{a}");
            assert_eq!(a["result"]["message"], "fleet", "{a}");
        }
    }
    let missing = up.api.get("/v1/measurements/nope").await;
    assert_eq!(missing.status, 404);
}
