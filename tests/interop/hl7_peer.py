#!/usr/bin/env python3
"""An independent HL7 v2 peer for the gateway's tests, built on python-hl7 (`pip install hl7`).

Two modes:

  hl7_peer.py send HOST PORT MESSAGES.json
      Sends each message of the JSON list (strings, segments ending in CR) with python-hl7's
      MLLPClient, one after the other on one connection, and prints one JSON line per message:
      {"sent": CONTROL_ID, "ack": "AA"|"AE"|"AR"|..., "acked": MSA-2}. A message whose answer
      does not come is printed with "ack": null and the connection is opened again.

  hl7_peer.py serve --port-file FILE --log FILE
      A receiving system (a RIS) on 127.0.0.1, on port $HL7_PEER_PORT or else an OS-chosen one,
      written to --port-file once it listens. Each message is read as raw bytes (python-hl7's MLLP reader, readblock) and
      appended to --log as one JSON line {"control_id", "ack", "raw"} *before* it is answered;
      the answer is built by python-hl7's Message.create_ack. The ACK code depends on the
      message control id (MSH-10), so that a test can ask for each outcome:
        - starts with "REJ": AR (application reject) every time, with an ERR segment
          (code 204, unknown key identifier, at PID-3);
        - starts with "ERR": AE (application error) every time, with an ERR segment
          (code 207, application internal error);
        - starts with "FIX": AE as for "ERR" while the file FILE.broken exists (FILE being
          --log), AA once it is gone: a receiving system that an operator fixes;
        - starts with "NOACK": no answer the first time (the connection is closed), AA after;
        - anything else: AA.
      Negative ACKs carry the patient's name (PID-5) in their free text (MSA-3, ERR-3.2 and
      ERR-8), as some systems do, so that a test can check the gateway never keeps or logs it.
"""

import asyncio
import json
import os
import sys

import hl7
import hl7.client
from hl7.mllp import start_hl7_server


def send(host, port, path):
    with open(path, encoding="utf-8") as f:
        messages = json.load(f)
    client = hl7.client.MLLPClient(host, int(port))
    for text in messages:
        control = str(hl7.parse(text).segment("MSH")(10))
        try:
            answer = client.send_message(text)
            ack = hl7.parse(answer.decode("utf-8").strip("\x0b\x1c\r\n"))
            msa = ack.segment("MSA")
            out = {"sent": control, "ack": str(msa(1)), "acked": str(msa(2))}
        except Exception as e:  # a closed connection, no ACK
            out = {"sent": control, "ack": None, "error": type(e).__name__}
            client.close()
            client = hl7.client.MLLPClient(host, int(port))
        print(json.dumps(out), flush=True)
    client.close()


async def serve(port_file, log_path):
    seen = set()

    async def on_client(reader, writer):
        try:
            while True:
                try:
                    block = await reader.readblock()
                except asyncio.IncompleteReadError:
                    return
                text = block.decode("utf-8")
                message = hl7.parse(text)
                control = str(message.segment("MSH")(10))
                first = control not in seen
                seen.add(control)
                broken = os.path.exists(log_path + ".broken")
                err = None
                if control.startswith("REJ"):
                    code = "AR"
                    err = "PID^1^3|204"
                elif control.startswith("ERR") or (control.startswith("FIX") and broken):
                    code = "AE"
                    err = "MSH^1^10|207"
                elif control.startswith("NOACK") and first:
                    code = None
                else:
                    code = "AA"
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps({"control_id": control, "ack": code, "raw": text}) + "\n")
                if code is None:
                    writer.close()
                    return
                answer = str(message.create_ack(code))
                if err is not None:
                    name = str(message.segment("PID")(5))
                    where, number = err.split("|")
                    answer = (
                        answer.rstrip("\r").replace(
                            "MSA|" + code + "|" + control,
                            "MSA|" + code + "|" + control + "|refused for " + name,
                        )
                        + "\rERR||" + where + "|" + number + "^refused for " + name
                        + "^HL70357|E||||ask about " + name + "\r"
                    )
                writer.writeblock(answer.encode("utf-8"))
                await writer.drain()
        finally:
            writer.close()

    server = await start_hl7_server(
        on_client, host="127.0.0.1", port=int(os.environ.get("HL7_PEER_PORT", "0"))
    )
    port = server.sockets[0].getsockname()[1]
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, port_file)
    async with server:
        await server.serve_forever()


def main():
    if len(sys.argv) >= 5 and sys.argv[1] == "send":
        send(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 6 and sys.argv[1] == "serve":
        args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
        asyncio.run(serve(args["--port-file"], args["--log"]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
