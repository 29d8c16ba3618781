/**
 * The MQTT 3.1.1 normative statements the conformance guard enforces (id → what it says, as
 * logged with code ECONN_MQTT_PROTOCOL). docs/mqtt-conformance.md has the full table, and
 * test/broker/conformance-statements.test.ts holds the ids used in code and tests against it.
 */

export const STATEMENTS = {
  'MQTT-1.5.3-1': 'strings must be well-formed UTF-8 (no surrogates, no overlongs)',
  'MQTT-1.5.3-2': 'strings must not contain U+0000',
  'MQTT-2.2.2-2': 'reserved fixed-header flags must have their listed value',
  'MQTT-2.3.1-1': 'SUBSCRIBE, UNSUBSCRIBE and QoS>0 PUBLISH need a non-zero packet identifier',
  'MQTT-3.1.0-1': 'the first packet must be CONNECT',
  'MQTT-3.1.0-2': 'a second CONNECT is a protocol violation',
  'MQTT-3.1.2-1': 'the protocol name must be "MQTT"',
  'MQTT-3.1.2-2': 'the protocol level must be one the server supports (4; 3 for MQIsdp)',
  'MQTT-3.1.2-3': 'the reserved CONNECT flag must be 0',
  'MQTT-3.1.2-9': 'Will Flag 1 requires Will Topic and Will Message',
  'MQTT-3.1.2-13': 'Will QoS must be 0 when Will Flag is 0',
  'MQTT-3.1.2-14': 'Will QoS must not be 3',
  'MQTT-3.1.2-15': 'Will Retain must be 0 when Will Flag is 0',
  'MQTT-3.1.2-18': 'no user name may follow when User Name Flag is 0',
  'MQTT-3.1.2-19': 'User Name Flag 1 requires a user name',
  'MQTT-3.1.2-20': 'no password may follow when Password Flag is 0',
  'MQTT-3.1.2-21': 'Password Flag 1 requires a password',
  'MQTT-3.1.2-22': 'Password Flag must be 0 when User Name Flag is 0',
  'MQTT-3.1.3-3': 'the client identifier must be present',
  'MQTT-3.1.3-8': 'an empty client id requires CleanSession 1',
  'MQTT-3.1.3-9': 'the server may reject a client id',
  'MQTT-3.1.4-1': 'the CONNECT must be well-formed',
  'MQTT-3.2.2-6': 'refusals without a matching 3.1.1 return code get no CONNACK',
  'MQTT-3.3.1-2': 'a QoS 0 PUBLISH must have DUP 0',
  'MQTT-3.3.1-4': 'a PUBLISH must not have both QoS bits set',
  'MQTT-3.3.2-2': 'a topic name must not contain wildcards',
  'MQTT-3.6.1-1': 'PUBREL fixed-header flags must be 0010',
  'MQTT-3.8.1-1': 'SUBSCRIBE fixed-header flags must be 0010',
  'MQTT-3.8.3-3': 'a SUBSCRIBE must contain at least one topic filter',
  'MQTT-3.8.3-4': 'SUBSCRIBE options: reserved bits 0 and QoS 0, 1 or 2',
  'MQTT-3.10.1-1': 'UNSUBSCRIBE fixed-header flags must be 0010',
  'MQTT-3.10.3-2': 'an UNSUBSCRIBE must contain at least one topic filter',
  'MQTT-3.14.1-1': 'DISCONNECT fixed-header flags must be 0000',
  'MQTT-4.7.1-1': 'wildcards are not allowed in a topic name',
  'MQTT-4.7.1-2': '# must be the last character and occupy a whole level',
  'MQTT-4.7.1-3': '+ must occupy a whole level',
  'MQTT-4.7.3-1': 'topic names and filters must be at least one character long',
  'MQTT-4.8.0-1': 'protocol violation (malformed or unexpected packet)',
  'limit:max_packet_bytes': 'packet larger than the configured maximum',
} as const;
export type StatementId = keyof typeof STATEMENTS;
