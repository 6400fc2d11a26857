//! UserEvents gRPC: the gateways' event stream, alarms, and key-change
//! reports. Served by the admin process beside AdminService.

use std::{pin::Pin, sync::Arc};

use chipsite_proto::events::v1::{self as pb, user_event::Event, user_events_server::UserEvents};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::{Admin, NewAlarm, Notifier, events::HubMessage, store::alarm};

#[derive(Debug, Clone)]
pub struct UserEventsGrpc {
    admin: Arc<Admin>,
    notifier: Arc<Notifier>,
}

impl UserEventsGrpc {
    pub fn new(admin: Arc<Admin>, notifier: Arc<Notifier>) -> Self {
        Self { admin, notifier }
    }
}

fn alarm_pb(a: alarm::Model) -> pb::Alarm {
    pb::Alarm {
        id: a.id,
        chip_id: a.chip_id,
        kind: a.kind,
        text: a.text,
        created_at_ms: a.created_at_ms,
        acked_at_ms: a.acked_at_ms,
        delivered_by: a.delivered_by,
    }
}

type R<T> = Result<Response<T>, Status>;
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::UserEvent, Status>> + Send>>;

#[tonic::async_trait]
impl UserEvents for UserEventsGrpc {
    type WatchStream = EventStream;

    async fn watch(&self, _: Request<pb::WatchRequest>) -> R<Self::WatchStream> {
        let rx = self.admin.hub().subscribe();
        // After an error the stream ends (tonic sends it as the status).
        let stream = futures::stream::unfold((rx, false), |(mut rx, ended)| async move {
            if ended {
                return None;
            }
            match rx.recv().await {
                Ok(HubMessage::Event(e)) => Some((Ok((*e).clone()), (rx, false))),
                Ok(HubMessage::Resync) => Some((
                    Err(chipsite_proto::status::status(
                        chipsite_proto::status::ErrorCode::Unavailable,
                        "events may have been missed; watch again",
                    )),
                    (rx, true),
                )),
                Err(RecvError::Lagged(n)) => Some((
                    Err(chipsite_proto::status::status(
                        chipsite_proto::status::ErrorCode::Throttled,
                        format!("fell {n} events behind; watch again"),
                    )),
                    (rx, true),
                )),
                Err(RecvError::Closed) => None,
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn raise_alarms(&self, req: Request<pb::RaiseAlarmsRequest>) -> R<pb::RaiseAlarmsResponse> {
        let caller = crate::grpc::actor(&req)?;
        let new: Vec<NewAlarm> = req
            .into_inner()
            .alarms
            .into_iter()
            .map(|a| NewAlarm {
                chip_id: a.chip_id,
                kind: a.kind,
                text: a.text,
            })
            .collect();
        let subject = match new.as_slice() {
            [one] => one.chip_id.clone(),
            many => format!("{} alarms", many.len()),
        };
        let stored = self.admin.raise_alarms(&new).await;
        let outcome = match &stored {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("{:?}: {e}", e.code()),
        };
        self.admin
            .audit(&caller, "raise_alarms", &subject, &outcome)
            .await?;
        let stored: Vec<pb::Alarm> = stored?.into_iter().map(alarm_pb).collect();
        self.admin
            .hub()
            .publish(
                stored
                    .iter()
                    .map(|a| pb::UserEvent {
                        event: Some(Event::Alarm(a.clone())),
                    })
                    .collect(),
            )
            .await?;
        self.notifier.after_raise(stored.iter().map(|a| a.id).collect());
        Ok(Response::new(pb::RaiseAlarmsResponse { alarms: stored }))
    }

    async fn list_alarms(&self, req: Request<pb::ListAlarmsRequest>) -> R<pb::ListAlarmsResponse> {
        let r = req.into_inner();
        if r.count_only {
            return Ok(Response::new(pb::ListAlarmsResponse {
                alarms: vec![],
                count: self.admin.count_alarms(&r.chip_id, r.include_acked).await?,
            }));
        }
        let limit = if r.limit == 0 { 100 } else { u64::from(r.limit) };
        let alarms = self.admin.list_alarms(&r.chip_id, r.include_acked, limit).await?;
        Ok(Response::new(pb::ListAlarmsResponse {
            alarms: alarms.into_iter().map(alarm_pb).collect(),
            count: 0,
        }))
    }

    async fn ack_alarm(&self, req: Request<pb::AckAlarmRequest>) -> R<pb::Alarm> {
        let r = req.into_inner();
        Ok(Response::new(alarm_pb(
            self.admin.ack_alarm(&r.chip_id, r.id).await?,
        )))
    }

    async fn alarms_delivered(
        &self,
        req: Request<pb::AlarmsDeliveredRequest>,
    ) -> R<pb::AlarmsDeliveredResponse> {
        let ids = req.into_inner().ids;
        self.admin.alarms_delivered(&ids).await?;
        for _ in &ids {
            crate::notify::delivered("session");
        }
        Ok(Response::new(pb::AlarmsDeliveredResponse {}))
    }

    async fn key_changed(&self, req: Request<pb::KeyChangedRequest>) -> R<pb::KeyChangedResponse> {
        let r = req.into_inner();
        crate::validate_chip_id(&r.chip_id)?;
        self.admin.publish_key_changed(&r.chip_id, r.public_key).await?;
        Ok(Response::new(pb::KeyChangedResponse {}))
    }
}
