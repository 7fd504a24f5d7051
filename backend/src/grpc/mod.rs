//! gRPC (tonic), `imn.v1.Imn` in backend/proto/imn/v1/imn.proto: the same operations as
//! REST, done by the same code (`fleet`, the registry's selection, the result feed), with
//! the same tokens (`authorization: Bearer …` metadata) and scopes.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use imn_proto::now_ms;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::fleet;
use crate::security::Scope;
use crate::service::Backend;

/// Generated from the proto file (see its header).
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    include!("imn.v1.rs");
}

/// An API error as a gRPC status, by its HTTP status.
fn status(e: ApiError) -> Status {
    let msg = e.to_string();
    match e.status().as_u16() {
        400 | 413 | 422 => Status::invalid_argument(msg),
        401 => Status::unauthenticated(msg),
        403 => Status::permission_denied(msg),
        404 => Status::not_found(msg),
        409 => Status::already_exists(msg),
        429 => Status::resource_exhausted(msg),
        503 => Status::unavailable(msg),
        _ => Status::internal(msg),
    }
}

/// A gRPC schedule as the REST body's `schedule`, so both are checked by one parser
/// (times in seconds since the epoch).
fn schedule_json(s: pb::Schedule) -> serde_json::Value {
    let mut v = serde_json::json!({"interval_s": s.interval_s});
    if s.start_ms != 0 {
        v["start"] = serde_json::json!(s.start_ms as f64 / 1000.0);
    }
    if s.stop_ms != 0 {
        v["stop"] = serde_json::json!(s.stop_ms as f64 / 1000.0);
    }
    if let Some(j) = s.jitter_s {
        v["jitter_s"] = serde_json::json!(j);
    }
    v
}

fn selection(s: pb::Selection, alive: Option<bool>) -> fleet::Selection {
    fleet::Selection {
        ids: s.ids,
        tags: s.tags,
        country: (!s.country.is_empty()).then_some(s.country),
        asn: (s.asn != 0).then_some(s.asn),
        all: s.all,
        alive,
        limit: (s.limit != 0).then_some(s.limit as usize),
    }
}

pub struct ImnService {
    b: Arc<Backend>,
}

impl ImnService {
    pub fn new(b: Arc<Backend>) -> ImnService {
        ImnService { b }
    }

    /// The caller's token, as REST checks it.
    fn authorize<T>(
        &self,
        req: &Request<T>,
        scope: Scope,
    ) -> Result<crate::security::Caller, Status> {
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").map(str::trim));
        self.b.security.authorize(bearer, scope).map_err(status)
    }
}

type ResultStream = Pin<Box<dyn Stream<Item = Result<pb::Result, Status>> + Send>>;

#[tonic::async_trait]
impl pb::imn_server::Imn for ImnService {
    async fn create_measurement(
        &self,
        req: Request<pb::CreateMeasurementRequest>,
    ) -> Result<Response<pb::CreateMeasurementResponse>, Status> {
        let caller = self.authorize(&req, Scope::Measure)?;
        let r = req.into_inner();
        let params = if r.params_json.trim().is_empty() {
            None
        } else {
            Some(
                serde_json::from_str(&r.params_json)
                    .map_err(|e| Status::invalid_argument(format!("params_json: {e}")))?,
            )
        };
        let m = fleet::NewMeasurement {
            module: r.module,
            params,
            agents: selection(r.agents.unwrap_or_default(), None),
            schedule: r.schedule.map(schedule_json),
            description: (!r.description.is_empty()).then_some(r.description),
            deadline_s: (r.deadline_s != 0.0).then_some(r.deadline_s),
        };
        let c = fleet::create(&self.b, m, None, caller)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateMeasurementResponse {
            id: c.id,
            agents: c.agents,
            refused: c
                .refused
                .into_iter()
                .map(|(agent_id, e)| pb::Refusal {
                    agent_id,
                    status: u32::from(e.status().as_u16()),
                    error: e.to_string(),
                })
                .collect(),
        }))
    }

    async fn get_measurement(
        &self,
        req: Request<pb::GetMeasurementRequest>,
    ) -> Result<Response<pb::Measurement>, Status> {
        self.authorize(&req, Scope::Read)?;
        let v = fleet::status(&self.b, &req.into_inner().id)
            .await
            .map_err(status)?;
        let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or_default() as u32;
        let p = &v["progress"];
        Ok(Response::new(pb::Measurement {
            id: s(&v["id"]),
            module: s(&v["module"]),
            state: s(&v["state"]),
            summary: s(&p["summary"]),
            agents: n(&p["agents"]),
            reported: n(&p["reported"]),
            pending: n(&p["pending"]),
            agent_states: v["agents"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|a| pb::AgentState {
                            agent_id: s(&a["agent_id"]),
                            request_id: s(&a["request_id"]),
                            state: s(&a["state"]),
                            result_json: if a["result"].is_null() {
                                String::new()
                            } else {
                                a["result"].to_string()
                            },
                            error: s(&a["error"]),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.authorize(&req, Scope::Read)?;
        let r = req.into_inner();
        let now = now_ms();
        let sel = selection(r.selection.unwrap_or_default(), r.alive);
        let agents = self
            .b
            .select(&sel, now)
            .into_iter()
            .map(|a| {
                let loc = a.hello.location.clone().unwrap_or_default();
                pb::Agent {
                    alive: a.alive(now),
                    version: a.hello.version.clone(),
                    arch: a.hello.arch.clone(),
                    tags: self.b.agent_tags(&a),
                    country: loc.country.unwrap_or_default(),
                    asn: loc.asn.unwrap_or_default(),
                    id: a.id,
                }
            })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    type StreamResultsStream = ResultStream;

    async fn stream_results(
        &self,
        req: Request<pb::StreamResultsRequest>,
    ) -> Result<Response<ResultStream>, Status> {
        let caller = self.authorize(&req, Scope::Read)?;
        let slot = self.b.feed.admit(&caller).map_err(status)?;
        let r = req.into_inner();
        let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
        let after = if r.cursor.is_empty() {
            self.b.latest_position().await.map_err(status)?
        } else {
            crate::api::parse_cursor(&r.cursor).map_err(status)?
        };
        let filter = crate::store::ResultFilter {
            agent: none_if_empty(r.agent),
            module: none_if_empty(r.module),
            measurement: none_if_empty(r.measurement),
            after,
            limit: 500,
            ..Default::default()
        };
        let stream = crate::feed::stream(self.b.clone(), filter, slot).map(|(pos, r, m)| {
            Ok(pb::Result {
                cursor: format!("c{pos}"),
                agent_id: r.agent_id,
                request_id: r.request_id,
                module: r.module,
                measurement_id: m.unwrap_or_default(),
                state: r.state.as_str().to_string(),
                result_json: if r.result.is_null() {
                    String::new()
                } else {
                    r.result.to_string()
                },
                error: r.error.unwrap_or_default(),
                finished_ms: r.finished_ms,
                scheduled_ms: r.scheduled_ms.unwrap_or(0),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the gRPC API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    b: Arc<Backend>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(pb::imn_server::ImnServer::new(ImnService::new(b)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}
